"""Config keys that carry their own rules and descriptions, for every config edge-kit reads.

A config section is a frozen dataclass whose fields are declared with `setting(...)`: default,
one-line description and rule (bounds, choices or a check) together. `check_rules` enforces them on a
parsed config and `markdown` renders the same declarations as a reference page (each config module's
`PAGE = ConfigPage(...)`, printed by `python -m <module> --markdown`), so the docs cannot drift from
the code. Adding a key is one line::

    workers: int = setting(1, "processes that train in parallel", lo=1)

The project config (`edge_kit.config`), the fleet config (`edge_kit.fleet.settings`) and the agent
config (`device_agent.settings`) all declare their keys this way. It lives in device_agent (stdlib
only) because the agent may not import edge_kit; `strict_toml` does the parsing and type checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from device_agent.errors import ConfigError

# (dotted key, value, the whole config) -> None; raises ConfigError. For rules that need files or
# other keys (a source path that must exist, k that may not exceed m).
Check = Callable[[str, Any, Any], None]
Choices = Sequence[str] | Callable[[], Sequence[str]]
# `setting(..., **POSITIVE)`: a count or duration above 0 (the bound itself excluded).
POSITIVE: Mapping[str, Any] = {"lo": 0.0, "open_lo": True}


@dataclass(frozen=True)
class Rule:
    doc: str
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False  # True: the bound itself is not allowed
    open_hi: bool = False
    choices: Choices | None = None  # a callable is resolved when checked (for lists owned elsewhere)
    check: Check | None = None
    allowed: str | None = None  # how the docs describe what `check` allows

    def allowed_choices(self) -> tuple[str, ...]:
        found = self.choices() if callable(self.choices) else self.choices
        return tuple(found or ())

    def verify(self, key: str, value: Any, config: Any) -> None:
        if value is None:  # only optional fields default to None; the type check let it through
            return
        if self.choices is not None:
            allowed = self.allowed_choices()
            if value not in allowed:
                raise ConfigError(key, f"{value!r} is not allowed", hint=f"allowed: {', '.join(allowed)}")
        if (self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo)) or (
                self.hi is not None and (value >= self.hi if self.open_hi else value > self.hi)):
            raise ConfigError(key, f"must be {self.bounds()}, got {value}")
        if self.check is not None:
            self.check(key, value, config)

    def bounds(self) -> str:
        """The allowed range in words, as the error message and the docs say it."""
        lo, hi = (None if b is None else f"{b:g}" for b in (self.lo, self.hi))
        if lo is not None and hi is not None:
            if self.open_lo and self.open_hi:
                return f"between {lo} and {hi}"
            excluded = (" (excluded)" if self.open_lo else "", " (excluded)" if self.open_hi else "")
            return f"between {lo}{excluded[0]} and {hi}{excluded[1]}"
        if lo is not None:
            if self.open_lo:
                return "positive" if lo == "0" else f"more than {lo}"
            return "0 or more" if lo == "0" else f"at least {lo}"
        if hi is not None:
            return f"less than {hi}" if self.open_hi else f"at most {hi}"
        return ""

    def describe_allowed(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append(", ".join(f"`{c}`" for c in self.allowed_choices()))
        if self.bounds():
            parts.append(self.bounds() + (" (both excluded)" if self.open_lo and self.open_hi else ""))
        if self.allowed:
            parts.append(self.allowed)
        return "; ".join(parts)


def setting(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None, open_lo: bool = False,
            open_hi: bool = False, choices: Choices | None = None, check: Check | None = None,
            allowed: str | None = None) -> Any:
    """A dataclass field with its default, description and rule (typed Any, as `dataclasses.field` is).

    A mutable default (a table or a list) is given as its type, `dict` or `list`, and built fresh for
    every config.
    """
    rule = Rule(doc, lo, hi, open_lo, open_hi, choices, check, allowed)
    if default in (dict, list):
        return dataclasses.field(default_factory=default, metadata={"rule": rule})
    return dataclasses.field(default=default, metadata={"rule": rule})


def subsection(cls: type) -> Any:
    """A dataclass field that holds another section (its own TOML table), not a key of this one."""
    return dataclasses.field(default_factory=cls, metadata={"subsection": True})


def rule_of(f: dataclasses.Field[Any]) -> Rule:
    rule = f.metadata.get("rule")
    if not isinstance(rule, Rule):
        raise TypeError(f"config field {f.name} is not declared with setting(): it has no description or rule")
    return rule


def keys_of(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of section `cls` that are its keys (every field but `subsection`s), in declaration order."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("subsection")]


def subsections_of(cls: type) -> tuple[str, ...]:
    """Names of the fields of `cls` declared with `subsection` (to skip when reading its table)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("subsection"))


def check_section(name: str, section: Any, config: Any) -> None:
    """Enforce the rule of every key of one section instance, in declaration order (the first error is raised)."""
    for f in keys_of(type(section)):
        rule_of(f).verify(f"{name}.{f.name}", getattr(section, f.name), config)


def check_rules(config: Any, sections: Mapping[str, type]) -> None:
    """Enforce every key's rule, section by section: `config.<name>` is the section called `name`."""
    for name in sections:
        check_section(name, getattr(config, name), config)


def check_given(cls: type, key: str, what: str, value: Any, config: Any = None) -> None:
    """Enforce the rule of key `key` of section `cls` on a value given another way (a command-line flag)."""
    field = next(f for f in keys_of(cls) if f.name == key)
    rule_of(field).verify(what, value, config)


def _toml(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{}" if not value else "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _type_name(annotation: Any) -> str:
    spec = str(annotation).replace(" ", "")
    optional = spec.endswith("|None")
    base = spec.removesuffix("|None")
    names = {"list[str]": "list of strings", "Path": "path"}
    base = "table" if base.startswith("dict") else names.get(base, base)
    return f"{base} (optional)" if optional else base


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def markdown(title: str, intro: str, sections: Mapping[str, type], *, notes: Iterable[str] = ()) -> str:
    """A reference page: per section its description and a table of keys, then a file of all defaults.

    `notes` are paragraphs printed after the intro (conventions shared by every key, such as `threads`).
    """
    lines = [f"# {title}", "", intro.strip(), ""]
    for note in notes:
        lines += [note.strip(), ""]
    for name, cls in sections.items():
        lines += [f"## [{name}]", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                  "| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        for f in keys_of(cls):
            rule = rule_of(f)
            cells = [f"`{f.name}`", _type_name(f.type), f"`{_toml(_default(f))}`", rule.describe_allowed(), rule.doc]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines += ["## Every key at its default", "", "```toml"]
    for name, cls in sections.items():
        lines.append(f"[{name}]")
        for f in keys_of(cls):
            value = _default(f)
            lines.append(f"# {f.name} = (unset)" if value is None else f"{f.name} = {_toml(value)}")
        lines.append("")
    lines[-1] = "```"
    return "\n".join(lines) + "\n"


# The one meaning of `threads = 0`, in every config that has a `threads` key.
THREADS_DOC = "0 = the library's default (all cores)"


@dataclass(frozen=True)
class ConfigPage:
    """A config's reference page, generated from its key declarations (`make docs` writes it)."""

    title: str
    intro: str
    sections: Mapping[str, type]

    def markdown(self) -> str:
        return markdown(self.title, self.intro, self.sections)

    def main(self, prog: str, argv: list[str] | None = None) -> int:
        """`python -m <module> --markdown`: print the page to stdout."""
        import argparse

        parser = argparse.ArgumentParser(prog=prog, description=f"Print the {self.title}.")
        parser.add_argument("--markdown", action="store_true", required=True, help="print the page to stdout")
        parser.parse_args(argv)
        print(self.markdown(), end="")
        return 0
