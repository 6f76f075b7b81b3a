"""Resource amounts in integer units, so that sums never drift (0.1 + 0.2 CPU)."""

from __future__ import annotations

from dataclasses import dataclass

from shipyard_core import validation

MILLIS_PER_CPU = 1000
MIB_PER_GIB = 1024


@dataclass(frozen=True)
class Amount:
    """CPU in millicores, memory in MiB, whole GPUs, instance count."""

    cpu_millis: int = 0
    memory_mib: int = 0
    gpu: int = 0
    instances: int = 0

    @classmethod
    def from_units(
        cls, *, cpu: float, memory_gib: float, gpu: int, instances: int, field: str = ""
    ) -> Amount:
        """From user units (cores, GiB), validated; ``field`` prefixes error field names."""
        prefix = f"{field}." if field else ""
        validation.non_negative(f"{prefix}cpu", cpu, maximum=1_000_000)
        validation.non_negative(f"{prefix}memory_gib", memory_gib, maximum=1_000_000)
        validation.non_negative(f"{prefix}gpu", gpu, maximum=100_000)
        validation.non_negative(f"{prefix}instances", instances, maximum=1_000_000)
        return cls(
            cpu_millis=round(cpu * MILLIS_PER_CPU),
            memory_mib=round(memory_gib * MIB_PER_GIB),
            gpu=int(gpu),
            instances=int(instances),
        )

    @property
    def cpu(self) -> float:
        """Cores."""
        return self.cpu_millis / MILLIS_PER_CPU

    @property
    def memory_gib(self) -> float:
        """GiB."""
        return self.memory_mib / MIB_PER_GIB

    def __add__(self, other: Amount) -> Amount:
        return Amount(
            self.cpu_millis + other.cpu_millis,
            self.memory_mib + other.memory_mib,
            self.gpu + other.gpu,
            self.instances + other.instances,
        )

    def __sub__(self, other: Amount) -> Amount:
        return Amount(
            self.cpu_millis - other.cpu_millis,
            self.memory_mib - other.memory_mib,
            self.gpu - other.gpu,
            self.instances - other.instances,
        )

    def times(self, n: int) -> Amount:
        """``n`` of this amount (an instance type's resources for ``n`` instances)."""
        return Amount(self.cpu_millis * n, self.memory_mib * n, self.gpu * n, self.instances * n)

    def clamp(self) -> Amount:
        """No negative parts (a quota lowered below usage shows nothing free)."""
        return Amount(
            max(0, self.cpu_millis),
            max(0, self.memory_mib),
            max(0, self.gpu),
            max(0, self.instances),
        )

    def shortfalls(self, free: Amount, growing: Amount | None = None) -> list[tuple[str, str]]:
        """For each dimension where this needs more than ``free``: (needed, free) text.

        With ``growing``, only dimensions that grow are checked (shrinking always fits,
        even when a lowered quota leaves less than is used)."""
        g = growing or self
        out = []
        if self.cpu_millis > free.cpu_millis and g.cpu_millis > 0:
            out.append((f"{_num(self.cpu)} CPU", f"{_num(max(free.cpu, 0))} CPU"))
        if self.memory_mib > free.memory_mib and g.memory_mib > 0:
            out.append(
                (
                    f"{_num(self.memory_gib)} GiB memory",
                    f"{_num(max(free.memory_gib, 0))} GiB memory",
                )
            )
        if self.gpu > free.gpu and g.gpu > 0:
            out.append((f"{self.gpu} GPU", f"{max(free.gpu, 0)} GPU"))
        if self.instances > free.instances and g.instances > 0:
            out.append((_count(self.instances, "instance"), _count(free.instances, "instance")))
        return out

    def describe(self) -> str:
        """``4 CPU, 8 GiB memory, 0 GPU, 4 instances``."""
        return (
            f"{_num(self.cpu)} CPU, {_num(self.memory_gib)} GiB memory, "
            f"{self.gpu} GPU, {_count(self.instances, 'instance')}"
        )


def _count(n: int, noun: str) -> str:
    n = max(n, 0)
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _num(value: float) -> str:
    return f"{value:g}"
