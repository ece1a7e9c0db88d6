"""The `model` section: which backbone to load and how."""

from __future__ import annotations

from pydantic import Field

from .base import ConfigIssue, Section


class LayerGroupPattern(Section):
    """One user-declared layer group: a name and the module-name patterns that belong to it."""

    name: str = Field(description="Name of the group, shown in logs and by `finetune inspect`.")
    modules: list[str] = Field(
        min_length=1,
        description="fnmatch patterns on module names (as in `model.named_modules()`), e.g. `encoder.layer.0.*`.",
    )


class LoraConfig(Section):
    """Low-rank adapters through peft; the backbone stays frozen and only the adapters and head train."""

    r: int = Field(8, ge=1, description="Rank of each adapter; higher fits more but trains more parameters.")
    lora_alpha: int = Field(16, ge=1, description="Scaling numerator; the update is scaled by lora_alpha / r.")
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; null lets peft pick the attention projections it knows."
    )


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Hub model id or local model folder (a `save_pretrained` folder, or a timm model as `timm/NAME`)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load; ignored for folders.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a Hub model. Off unless you trust the model's author."
    )
    layer_groups: list[LayerGroupPattern] | None = Field(
        None,
        description="Ordered layer groups, bottom (input side) to top, for backbones whose groups are not discovered.",
    )
    lora: LoraConfig | None = Field(None, description="Train low-rank adapters instead of the backbone's weights.")

    def problems(self) -> list[ConfigIssue]:
        issues = []
        if not self.name_or_path.strip():
            issues.append(
                ConfigIssue("model.name_or_path", self.name_or_path, "is empty.", "give a Hub id or a model folder.")
            )
        if self.layer_groups:
            names = [group.name for group in self.layer_groups]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                issues.append(
                    ConfigIssue("model.layer_groups", duplicates, "group names repeat.", "give each group its own name.")
                )
        return issues
