"""Generated and mutated request messages for every Expunge RPC (hypothesis strategies).

Used by the short fuzz test in the suite and the long fuzz run in the reliability
benchmark. Field values are drawn from the message descriptors, biased towards the
values that reach deep code paths (a real model name, tensors of plausible shapes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from hypothesis import strategies as st

from expunge.v1 import expunge_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Expunge"]
MODEL_NAMES = st.sampled_from(
    [
        "digits",
        "models/digits",
        "models/digits/versions/1",
        "",
        "nosuch",
        "models/",
        "DIGITS",
        "models/digits/versions/99999999999",
    ]
)
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 2000))
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-3, 50))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)


def _tensor() -> st.SearchStrategy[pb.Tensor]:
    def build(dtype: str, shape: list[int], fill: float, fuzz_bytes: bytes | None) -> pb.Tensor:
        sizes = {"float32": 4, "float64": 8, "int64": 8, "uint8": 1, "float16": 2, "int32": 4}
        if (
            fuzz_bytes is not None
            or dtype not in sizes
            or any(s < 0 for s in shape)
            or math.prod(shape or [0]) > 10_000
        ):
            return pb.Tensor(dtype=dtype, shape=shape, data=fuzz_bytes or b"")
        count = math.prod(shape) if shape else 0
        data = (
            np.full(count, fill, dtype=np.dtype(dtype)).tobytes()
            if np.isfinite(fill) or dtype.startswith("float")
            else b""
        )
        return pb.Tensor(dtype=dtype, shape=shape, data=data)

    shapes = st.one_of(
        st.just([2, 1, 8, 8]),
        st.just([1, 64]),
        st.lists(st.integers(-2, 9), max_size=5),
        st.lists(st.integers(0, 2**40), max_size=3),
    )
    return st.builds(
        build,
        st.sampled_from(
            ["float32", "float32", "float64", "int64", "uint8", "complex64", "", "float16"]
        ),
        shapes,
        st.one_of(st.floats(0, 1), FLOATS),
        st.one_of(st.none(), st.none(), st.binary(max_size=64)),
    )


def _field_value(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = field.type
    if field.name in ("model",) and t == d.FieldDescriptor.TYPE_STRING:
        return MODEL_NAMES
    if field.name == "name" and t == d.FieldDescriptor.TYPE_STRING:
        return st.one_of(MODEL_NAMES, st.text(max_size=40), st.just("operations/x"))
    if t == d.FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "expunge.v1.Tensor":
            return _tensor()
        return message_strategy(field.message_type, depth + 1)
    if t == d.FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if t == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return FLOATS
    if t == d.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if t in (
        d.FieldDescriptor.TYPE_INT32,
        d.FieldDescriptor.TYPE_SINT32,
        d.FieldDescriptor.TYPE_SFIXED32,
    ):
        return INT32
    return INT64


def message_strategy(descriptor: d.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with a random subset of fields set to random values."""
    cls = _message_class(descriptor)
    if depth > 3:
        return st.just(cls())
    fields = [
        f
        for f in descriptor.fields
        if not (f.message_type and f.message_type.GetOptions().map_entry)
    ]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for field in fields:
            if not draw(st.booleans()):
                continue
            value = _field_value(field, depth)
            if field.is_repeated:
                values = draw(st.lists(value, max_size=4))
                target = getattr(msg, field.name)
                if field.type == d.FieldDescriptor.TYPE_MESSAGE:
                    for v in values:
                        target.add().CopyFrom(v)
                else:
                    target.extend(values)
            elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, field.name).CopyFrom(draw(value))
            else:
                setattr(msg, field.name, draw(value))
        return msg

    return build()


def mutated(descriptor: d.Descriptor) -> st.SearchStrategy[Message]:
    """Valid messages whose serialised bytes had bits flipped, kept when they still parse."""
    cls = _message_class(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        raw = bytearray(draw(message_strategy(descriptor)).SerializeToString())
        for _ in range(draw(st.integers(0, 4))):
            if raw:
                i = draw(st.integers(0, len(raw) - 1))
                raw[i] ^= 1 << draw(st.integers(0, 7))
        msg = cls()
        try:
            msg.ParseFromString(bytes(raw))
        except Exception:
            msg = cls()
        return msg

    return build()


def _message_class(descriptor: d.Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def request_strategy(method: d.MethodDescriptor) -> st.SearchStrategy[Message]:
    return st.one_of(message_strategy(method.input_type), mutated(method.input_type))
