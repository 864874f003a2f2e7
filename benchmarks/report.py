"""Figures, their targets, and the one table every run prints.

Each figure is measured next to a baseline from the same run, so the ratio
between them says more than either number on a shared, noisy machine. The
table is Markdown, ready to paste into an issue or the README.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

MIB = 1024 * 1024


class Unit(StrEnum):
    RATE = "msg/s"
    SECONDS = "s"
    BYTES = "bytes"


def show(value: float | None, unit: Unit) -> str:
    if value is None:
        return "-"
    if unit is Unit.RATE:
        return f"{value:,.0f} msg/s"
    if unit is Unit.SECONDS:
        return f"{value * 1000:,.0f} ms" if value < 10 else f"{value:,.1f} s"
    if value < MIB:
        return f"{value / 1024:,.1f} KiB"
    return f"{value / MIB:,.1f} MiB"


@dataclass(frozen=True)
class Target:
    """A bound on the value itself or on its ratio to the baseline."""

    bound: float
    at_least: bool
    on_ratio: bool

    @classmethod
    def value_at_least(cls, bound: float) -> Target:
        return cls(bound, at_least=True, on_ratio=False)

    @classmethod
    def value_below(cls, bound: float) -> Target:
        return cls(bound, at_least=False, on_ratio=False)

    @classmethod
    def ratio_at_least(cls, bound: float) -> Target:
        return cls(bound, at_least=True, on_ratio=True)

    @classmethod
    def ratio_at_most(cls, bound: float) -> Target:
        return cls(bound, at_least=False, on_ratio=True)

    def text(self, unit: Unit) -> str:
        sign = ">=" if self.at_least else "<=" if self.on_ratio else "<"
        if self.on_ratio:
            return f"{sign} {self.bound:g}x"
        return f"{sign} {show(self.bound, unit)}"

    def met(self, value: float, ratio: float | None) -> bool | None:
        measured = ratio if self.on_ratio else value
        if measured is None:
            return None
        if self.at_least:
            return measured >= self.bound
        return measured <= self.bound if self.on_ratio else measured < self.bound


@dataclass
class Figure:
    name: str
    value: float | None
    unit: Unit
    baseline: str = ""
    baseline_value: float | None = None
    target: Target | None = None
    note: str = ""
    error: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        return self.target.met(self.value, self.ratio)

    @classmethod
    def failed(cls, name: str, error: BaseException | str) -> Figure:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return cls(name, None, Unit.RATE, error=text)


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    seconds: float = 0.0
    quick: bool = False

    def render(self) -> str:
        header = [
            "figure",
            "value",
            "baseline",
            "baseline value",
            "ratio",
            "target",
            "met?",
        ]
        rows = [header]
        notes: list[str] = []
        for figure in self.figures:
            rows.append(_row(figure, notes))

        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [_line(rows[0], widths), _line(["-" * w for w in widths], widths)]
        lines += [_line(row, widths) for row in rows[1:]]

        mode = "quick run" if self.quick else "full run"
        out = [machine(), f"{mode}, {self.seconds:,.0f} s in all", "", *lines]
        if notes:
            out += ["", *notes]
        return "\n".join(out)


def _row(figure: Figure, notes: list[str]) -> list[str]:
    name = figure.name
    if figure.note or figure.error:
        notes.append(f"[{len(notes) + 1}] {figure.error or figure.note}")
        name += f" [{len(notes)}]"
    if figure.error:
        return [name, "failed", "", "", "", "", "-"]

    ratio = figure.ratio
    met = figure.met
    return [
        name,
        show(figure.value, figure.unit),
        figure.baseline,
        show(figure.baseline_value, figure.unit) if figure.baseline else "",
        f"{ratio:.2f}x" if ratio is not None else "-",
        figure.target.text(figure.unit) if figure.target else "-",
        "-" if met is None else "yes" if met else "NO",
    ]


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
    return "| " + " | ".join(padded) + " |"


def machine() -> str:
    """What the figures were measured on: they mean little without it."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
