"""Built-in model architectures, addressed by name.

Every model maps a batch of inputs of shape ``(B, *input_shape)`` to logits of shape
``(B, num_classes)``. Dense models flatten their input first, so image data can be
stored with its natural shape (digits: ``(1, 8, 8)``) and served to any architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .task import attach_task, builtin_task

ARCHITECTURES = ("logreg", "mlp", "cnn", "resnet")


@dataclass(frozen=True)
class ArchitectureSpec:
    """What to build: a named architecture with its input shape and class count."""

    name: str = field(metadata={"help": "logreg, mlp, cnn, resnet, or a trusted factory's name"})
    input_shape: tuple[int, ...] = field(metadata={"help": "shape of one input, no batch axis"})
    num_classes: int = field(metadata={"help": "number of output classes"})
    hidden: tuple[int, ...] = field(default=(32,), metadata={"help": "MLP hidden widths"})
    activation: str = field(default="tanh", metadata={"help": "tanh or relu (MLP)"})
    channels: int = field(default=8, metadata={"help": "CNN/ResNet base channels"})
    loss: str = field(
        default="cross_entropy",
        metadata={"help": "the training loss: cross_entropy, or a trusted factory's Task"},
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "cross_entropy's, in [0, 1)"})

    def __post_init__(self) -> None:
        # Names outside ARCHITECTURES are allowed: a server may map them to trusted factories.
        if self.num_classes < 2:
            raise ValueError("num_classes must be at least 2")
        if self.name in ("cnn", "resnet") and len(self.input_shape) != 3:
            raise ValueError(
                f"{self.name} needs image inputs of shape (channels, height, width); "
                f"got input_shape={self.input_shape}"
            )
        if self.activation not in ("tanh", "relu"):
            raise ValueError("activation must be 'tanh' or 'relu'")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must lie in [0, 1)")
        if self.label_smoothing and self.loss != "cross_entropy":
            raise ValueError("label_smoothing applies to the cross_entropy loss only")

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "channels": self.channels,
            "loss": self.loss,
            "label_smoothing": self.label_smoothing,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ArchitectureSpec:
        return cls(
            name=str(data["name"]),
            input_shape=tuple(int(v) for v in data["input_shape"]),  # type: ignore[attr-defined]
            num_classes=int(data["num_classes"]),  # type: ignore[call-overload]
            hidden=tuple(int(v) for v in data.get("hidden", (32,))),  # type: ignore[attr-defined]
            activation=str(data.get("activation", "tanh")),
            channels=int(data.get("channels", 8)),  # type: ignore[call-overload]
            loss=str(data.get("loss", "cross_entropy")),
            label_smoothing=float(data.get("label_smoothing", 0.0)),  # type: ignore[arg-type]
        )


def _activation(name: str) -> nn.Module:
    return nn.Tanh() if name == "tanh" else nn.ReLU()


def _input_size(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm and a skip connection."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def build_model(spec: ArchitectureSpec, seed: int = 0) -> nn.Module:
    """Build the architecture with weights initialised from ``seed`` (no global RNG)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = _build(spec)
    finally:
        torch.random.set_rng_state(generator_state)
    task = builtin_task(spec.loss, spec.label_smoothing)
    if task is None:
        raise ValueError(f"loss {spec.loss!r} is not built in; a server may trust a factory")
    return attach_task(model, task)


def _build(spec: ArchitectureSpec) -> nn.Module:
    if spec.name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {spec.name!r}; expected one of {ARCHITECTURES}")
    if spec.name == "logreg":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(_input_size(spec.input_shape), spec.num_classes)
        )
    if spec.name == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = _input_size(spec.input_shape)
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), _activation(spec.activation)]
            width = hidden
        layers.append(nn.Linear(width, spec.num_classes))
        return nn.Sequential(*layers)
    channels_in = spec.input_shape[0]
    c = spec.channels
    if spec.name == "cnn":
        return nn.Sequential(
            nn.Conv2d(channels_in, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * c * 4, spec.num_classes),
        )
    return nn.Sequential(
        nn.Conv2d(channels_in, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        BasicBlock(c, c, 1),
        BasicBlock(c, 2 * c, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * c, spec.num_classes),
    )


def output_layer_name(model: nn.Module) -> str:
    """Module name of the last Linear layer (the output layer, whose rows are the classes)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("model has no Linear output layer")
    return names[-1]
