"""``python -m expunge.client.cli``: the ``expunge`` command."""

import sys

from . import main

sys.exit(main())
