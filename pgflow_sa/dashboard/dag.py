"""A flow's DAG as an SVG drawn on the server: steps as boxes laid out in columns by
depth (a step sits one column right of its deepest dependency), dependencies as
arrows, map steps drawn as a stack of boxes. Pure functions, no database."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

BOX_WIDTH = 150
BOX_HEIGHT = 40
COLUMN_GAP = 50
ROW_GAP = 18
MARGIN = 10
LABEL_CHARS = 20


@dataclass(frozen=True)
class StepNode:
    """What the drawing needs of a step: its slug, type ('single' or 'map') and the
    slugs it depends on."""

    slug: str
    step_type: str
    deps: tuple[str, ...]


def _columns(steps: Sequence[StepNode]) -> dict[str, int]:
    """Each step's column: 0 for roots, else one more than its deepest dependency.
    pgflow adds steps after their dependencies, so one pass in step order suffices."""
    column: dict[str, int] = {}
    for step in steps:
        column[step.slug] = 1 + max((column.get(dep, 0) for dep in step.deps), default=-1)
    return column


def _label(slug: str, width: int) -> str:
    return slug if len(slug) <= width else slug[: width - 1] + "\u2026"


def render_dag(steps: Sequence[StepNode], statuses: Mapping[str, str] | None = None) -> str:
    """The SVG of these steps (in step order). With ``statuses`` (slug -> step status)
    every box carries the class ``s-<status>`` so a stylesheet colours it, and a page
    can recolour it live: each box is ``<g class="step ..." data-step="<slug>">``."""
    column = _columns(steps)
    rows: dict[int, int] = {}
    where: dict[str, tuple[int, int]] = {}
    for step in steps:
        col = column[step.slug]
        row = rows.get(col, 0)
        rows[col] = row + 1
        where[step.slug] = (
            MARGIN + col * (BOX_WIDTH + COLUMN_GAP),
            MARGIN + row * (BOX_HEIGHT + ROW_GAP),
        )
    width = MARGIN * 2 + (max(column.values(), default=0) + 1) * (BOX_WIDTH + COLUMN_GAP)
    height = MARGIN * 2 + max(rows.values(), default=1) * (BOX_HEIGHT + ROW_GAP)
    parts = [
        f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>',
    ]
    for step in steps:
        x2, y2 = where[step.slug]
        for dep in step.deps:
            if dep not in where:
                continue
            x1, y1 = where[dep]
            sx, sy = x1 + BOX_WIDTH, y1 + BOX_HEIGHT // 2
            ex, ey = x2 - 4, y2 + BOX_HEIGHT // 2
            mid = (sx + ex) // 2
            parts.append(
                f'<path class="edge" data-from="{escape(dep)}" data-to="{escape(step.slug)}" '
                f'd="M{sx},{sy} C{mid},{sy} {mid},{ey} {ex},{ey}" marker-end="url(#arrow)"/>'
            )
    for step in steps:
        x, y = where[step.slug]
        status = (statuses or {}).get(step.slug)
        classes = "step" + (" map" if step.step_type == "map" else "")
        if status is not None:
            classes += f" s-{escape(status)}"
        slug = escape(step.slug)
        parts.append(f'<g class="{classes}" data-step="{slug}"><title>{slug}</title>')
        if step.step_type == "map":
            # a stack of boxes: one step, many tasks
            parts.append(
                f'<rect class="shadow" x="{x + 5}" y="{y - 4}" width="{BOX_WIDTH - 5}" '
                f'height="{BOX_HEIGHT}" rx="5"/>'
            )
        parts.append(
            f'<rect class="box" x="{x}" y="{y}" width="{BOX_WIDTH - 5}" height="{BOX_HEIGHT}" rx="5"/>'
        )
        if step.step_type == "map":
            label = escape(_label(step.slug, LABEL_CHARS - 6)) + " [map]"
        else:
            label = escape(_label(step.slug, LABEL_CHARS))
        parts.append(
            f'<text x="{x + (BOX_WIDTH - 5) // 2}" y="{y + BOX_HEIGHT // 2 + 5}" '
            f'text-anchor="middle">{label}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)
