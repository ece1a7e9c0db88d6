"""Shared machinery of the config schema: the strict section base class and config issues."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=False)

    @model_validator(mode="before")
    @classmethod
    def _yaml_booleans_as_choices(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `no`, `true` or `false` as a boolean. For a choice field that lists the word
        # (mixed_precision: no, eval_strategy: no, cache_features: true), the user meant the word.
        if not isinstance(data, dict):
            return data
        converted = dict(data)
        for name, field in cls.model_fields.items():
            value = converted.get(name)
            if not isinstance(value, bool):
                continue
            choices = _literal_choices(field.annotation)
            for word in (("true", "yes", "on") if value else ("false", "no", "off")):
                if word in choices:
                    converted[name] = word
                    break
        return converted

    def problems(self) -> list[ConfigIssue]:
        """Return the section's consistency problems (settings that contradict each other)."""
        return []


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: the dotted key, the offending value, what is wrong and how to fix it."""

    key: str
    value: Any
    message: str
    fix: str = ""

    def render(self) -> str:
        shown = _short_repr(self.value)
        text = f"{self.key} = {shown}: {self.message}"
        if self.fix:
            text += f" Fix: {self.fix}"
        return text


class ConfigError(ValueError):
    """Raised with every problem found in a config at once, so a user fixes them in one pass."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None):
        self.issues = list(issues)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.issues)} problem(s){where}:"]
        lines += [f"  - {issue.render()}" for issue in self.issues]
        super().__init__("\n".join(lines))


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _literal_choices(annotation: Any) -> tuple:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(choice for arg in get_args(annotation) for choice in _literal_choices(arg))
