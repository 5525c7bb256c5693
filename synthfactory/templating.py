"""The package's Jinja2 templates (synthfactory/templates/): the audit summary and internal
report, the dataset and model cards, evaluation.md. One environment for all of them, so that
Markdown and HTML are handled the same everywhere."""

from __future__ import annotations


def environment(markdown: bool = False, strict: bool = False):
    """A Jinja2 environment over synthfactory/templates: HTML autoescaped, Markdown verbatim (no
    trailing newline added); filter `pct`. `strict`: a name or key the context lacks is an error,
    not an empty string (what goes public must not lose a figure silently). Filters: `pct`, and
    `fmt3` (three decimals, for a list of figures through `map`)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, Undefined

    env = Environment(
        loader=PackageLoader("synthfactory", "templates"),
        autoescape=not markdown,
        keep_trailing_newline=not markdown,
        undefined=StrictUndefined if strict else Undefined,
    )
    env.filters["pct"] = lambda x: f"{x:.0%}"
    env.filters["fmt3"] = lambda x: "n/a" if x is None else f"{x:.3f}"
    return env
