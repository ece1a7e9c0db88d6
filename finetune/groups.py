"""Layer groups: a backbone split into ordered parts that a schedule freezes, unfreezes and gives rates.

Groups run bottom (input side) to top: the embeddings or stem, one group per block (encoder layer or stage),
the neck (pooler, final norm) when there is one, and the head last. Every parameter of the model is in
exactly one group, so the optimizer can hold one parameter group per layer group from step 0.

Discovery, in order of precedence:

1. `model.layer_groups` patterns from the config (fnmatch on module names), for any model;
2. timm models (bare, or wrapped by transformers' `TimmWrapperForImageClassification` at `.timm_model`):
   timm's own `group_matcher(coarse=False)`, with the classifier split off as the head;
3. transformers models: parameters outside `model.base_model` are the head. Inside it, the largest
   `nn.ModuleList` (by parameter count) contains the blocks. Parameters registered before that list are the
   embeddings, and those registered after it are the neck.

A peft model is grouped through `get_base_model()`, and parameter names keep the peft prefix.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from .config import ConfigError, ConfigIssue, LayerGroupPattern
from .log import get_logger

logger = get_logger(__name__)

# DeBERTa-v2/v3 encoders hold relative-position embeddings (and their norm and conv) next to the layer list.
# Every layer reads them, so they belong with the embeddings, not after the last layer.
_BOTTOM_SIBLINGS_OF_BLOCKS = ("rel_embeddings", "LayerNorm", "conv")

_PATTERN_EXAMPLE = """model:
  layer_groups:          # bottom (input side) to top; the last group is the head
    - name: embeddings
      modules: ["embeddings*"]
    - name: blocks
      modules: ["encoder.*"]
    - name: head
      modules: ["classifier*"]"""


@dataclass
class LayerGroup:
    """One layer group: its name, the modules wholly inside it and its (name, parameter) pairs.

    `module_names` are the largest modules whose parameters all belong to this group, and `modules` are the
    same modules, so calling `.eval()` on them reaches every submodule of the group, dropout included. Module
    names are those of the unwrapped model (inside a peft wrapper); parameter names are the model's own.
    """

    name: str
    module_names: list[str] = field(default_factory=list)
    parameters: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    is_head: bool = False
    modules: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def num_parameters(self) -> int:
        return sum(parameter.numel() for _, parameter in self.parameters)


class LayerGroupError(ConfigError):
    """Raised when a model cannot be split into layer groups, with the config that declares them.

    A `ConfigError`, so the training run ends with the config-error exit code; the message is the text alone.
    """

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.issues = [ConfigIssue("model.layer_groups", "", message)]
        self.source = None


def discover_layer_groups(model: nn.Module, patterns: list[LayerGroupPattern] | None = None) -> list[LayerGroup]:
    """Split `model` into ordered layer groups, bottom → blocks → neck → head (the last group).

    `patterns` (the config's `model.layer_groups`) take precedence over discovery. Raises `LayerGroupError`
    naming the model class when the architecture is unknown or patterns leave parameters ungrouped.
    """
    inner, prefix_map = _unwrap_peft(model)
    if patterns:
        assignment = _assign_by_patterns(inner, patterns)
    else:
        assignment = _assign_timm(inner) or _assign_transformers(inner)
    groups = _build_groups(inner, assignment)
    _check_every_parameter_grouped(inner, groups)
    if prefix_map:
        groups = _rename_for_wrapper(groups, prefix_map)
    return groups


# ---------------------------------------------------------------------------------------------------------------
# Assignments: ordered {group name: [parameter names]}, the last one being the head.


def _assign_by_patterns(model: nn.Module, patterns: list[LayerGroupPattern]) -> dict[str, list[str]]:
    # A parameter belongs to the first group with a pattern matching its module or any ancestor module.
    assignment: dict[str, list[str]] = {pattern.name: [] for pattern in patterns}
    unmatched = []
    for name, _ in model.named_parameters():
        owners = _ancestor_module_names(name)
        group = next(
            (p.name for p in patterns if any(fnmatch.fnmatchcase(o, m) for o in owners for m in p.modules)), None
        )
        if group is None:
            unmatched.append(name)
        else:
            assignment[group].append(name)
    if unmatched:
        listed = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        raise LayerGroupError(
            f"model.layer_groups leaves {len(unmatched)} parameter(s) of {type(model).__name__} without a group: "
            f"{listed}. Add patterns that match their modules (see `finetune inspect MODEL`)."
        )
    empty = [name for name, members in assignment.items() if not members]
    if empty:
        raise LayerGroupError(
            f"model.layer_groups group(s) {empty} match no parameter of {type(model).__name__}; "
            "fix their module patterns or remove them."
        )
    return assignment


def _assign_timm(model: nn.Module) -> dict[str, list[str]] | None:
    timm_model, prefix = _find_timm_model(model)
    if timm_model is None:
        return None
    from timm.models import group_parameters

    head_names = _head_parameter_names(timm_model)
    # group_parameters returns {ordinal: [names]} in bottom-to-top order; names that no regex matches (neck and
    # head) get the largest ordinal. The head is taken out of it and becomes the last group.
    ordered = group_parameters(timm_model, timm_model.group_matcher(coarse=False))
    members_list = [[name for name in members if name not in head_names] for _, members in sorted(ordered.items())]
    members_list = [members for members in members_list if members]
    assignment: dict[str, list[str]] = {}
    for index, members in enumerate(members_list):
        label = _common_module_prefix(members) or ("stem" if index == 0 else _joined_top_modules(members))
        assignment[_unique(label, assignment)] = [prefix + name for name in members]
    assignment["head"] = [prefix + name for name in head_names]
    return assignment


def _find_timm_model(model: nn.Module) -> tuple[nn.Module | None, str]:
    candidates = [(model, "")]
    if hasattr(model, "timm_model"):
        candidates.insert(0, (model.timm_model, "timm_model."))
    for candidate, prefix in candidates:
        if hasattr(candidate, "group_matcher") and hasattr(candidate, "get_classifier"):
            try:
                candidate.group_matcher(coarse=False)
            except NotImplementedError:
                continue
            return candidate, prefix
    return None, ""


def _head_parameter_names(timm_model: nn.Module) -> list[str]:
    head = timm_model.get_classifier()
    if isinstance(head, nn.Module):
        heads = [head]
    else:  # distilled models (DeiT) return a tuple (head, head_dist)
        heads = [module for module in head if isinstance(module, nn.Module)]
    owned = {id(parameter) for module in heads for parameter in module.parameters()}
    return [name for name, parameter in timm_model.named_parameters() if id(parameter) in owned]


def _assign_transformers(model: nn.Module) -> dict[str, list[str]]:
    base = getattr(model, "base_model", None)
    base_prefix = getattr(model, "base_model_prefix", "")
    if base is None or base is model or not base_prefix:
        raise _unknown_architecture(model, "it has no separate base model and head")
    blocks_name, blocks = _largest_module_list(base)
    if blocks is None:
        raise _unknown_architecture(model, "no list of blocks (nn.ModuleList) was found in its base model")
    prefix = f"{base_prefix}."
    block_prefix = f"{prefix}{blocks_name}."
    parent = blocks_name.rpartition(".")[0]
    bottom_siblings = tuple(f"{prefix}{parent + '.' if parent else ''}{name}." for name in _BOTTOM_SIBLINGS_OF_BLOCKS)

    assignment: dict[str, list[str]] = {"embeddings": []}
    assignment.update({f"{blocks_name}.{index}": [] for index in range(len(blocks))})
    assignment["neck"], assignment["head"] = [], []
    seen_blocks = False
    for name, _ in model.named_parameters():
        if not name.startswith(prefix):
            assignment["head"].append(name)
        elif name.startswith(block_prefix):
            index = name[len(block_prefix):].split(".", 1)[0]
            assignment[f"{blocks_name}.{index}"].append(name)
            seen_blocks = True
        elif name.startswith(bottom_siblings) or not seen_blocks:
            assignment["embeddings"].append(name)
        else:
            assignment["neck"].append(name)
    if not assignment["head"]:
        raise _unknown_architecture(model, "no parameters lie outside its base model, so no head was found")
    return {name: members for name, members in assignment.items() if members}


def _largest_module_list(base: nn.Module) -> tuple[str, nn.ModuleList | None]:
    # Lists of two or more modules come first, because a one-item list is more often a wrapper than the blocks.
    # A model configured with a single layer has only one-item lists, and its block list is then the largest.
    for min_length in (2, 1):
        found = _largest_module_list_of(base, min_length)
        if found[1] is not None:
            return found
    return "", None


def _largest_module_list_of(base: nn.Module, min_length: int) -> tuple[str, nn.ModuleList | None]:
    # The outermost list wins a tie: Swin's list of stages contains the lists of blocks inside each stage.
    best_name, best, best_count = "", None, 0
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= min_length:
            count = sum(parameter.numel() for parameter in module.parameters())
            if count > best_count:
                best_name, best, best_count = name, module, count
    return best_name, best


def _unknown_architecture(model: nn.Module, reason: str) -> LayerGroupError:
    return LayerGroupError(
        f"Cannot split {type(model).__name__} into layer groups: {reason}. Declare the groups in the config "
        f"with module-name patterns (`finetune inspect MODEL` lists module names), for example:\n{_PATTERN_EXAMPLE}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Building LayerGroup objects from an assignment.


def _build_groups(model: nn.Module, assignment: dict[str, list[str]]) -> list[LayerGroup]:
    parameters = dict(model.named_parameters())
    group_of = {name: group for group, members in assignment.items() for name in members}
    roots = _root_modules(model, group_of)
    names = list(assignment)
    return [
        LayerGroup(
            name=group,
            module_names=roots.get(group, []),
            modules=[model.get_submodule(name) for name in roots.get(group, [])],
            parameters=[(name, parameters[name]) for name in members],
            is_head=(index == len(names) - 1),
        )
        for index, (group, members) in enumerate(assignment.items())
    ]


def _root_modules(model: nn.Module, group_of: dict[str, str]) -> dict[str, list[str]]:
    # A module is a root of group G when all its parameters (recursively) are in G and its parent's are not
    # all in G. Parameterless modules are covered through their parent when the parent is a root.
    module_groups: dict[str, set[str]] = {}
    for name in group_of:
        for owner in _ancestor_module_names(name):
            module_groups.setdefault(owner, set()).add(group_of[name])
    roots: dict[str, list[str]] = {}
    for name, _ in model.named_modules():
        groups = module_groups.get(name)
        if not groups or len(groups) > 1:
            continue
        parent = name.rpartition(".")[0] if name else None
        if parent is not None and module_groups.get(parent) == groups:
            continue
        roots.setdefault(next(iter(groups)), []).append(name)
    return roots


def _check_every_parameter_grouped(model: nn.Module, groups: list[LayerGroup]) -> None:
    grouped = [id(parameter) for group in groups for _, parameter in group.parameters]
    if len(grouped) != len(set(grouped)):
        raise RuntimeError(
            f"internal error: a parameter of {type(model).__name__} is in two layer groups. Please report it."
        )
    missing = [name for name, parameter in model.named_parameters() if id(parameter) not in set(grouped)]
    if missing:
        raise RuntimeError(
            f"internal error: parameters of {type(model).__name__} without a layer group: {missing[:5]}. "
            "Please report it."
        )


def _unwrap_peft(model: nn.Module) -> tuple[nn.Module, dict[int, str] | None]:
    get_base_model = getattr(model, "get_base_model", None)
    if get_base_model is None or not callable(get_base_model):
        return model, None
    inner = get_base_model()
    if inner is model:
        return model, None
    return inner, {id(parameter): name for name, parameter in model.named_parameters()}


def _rename_for_wrapper(groups: list[LayerGroup], outer_names: dict[int, str]) -> list[LayerGroup]:
    # Module names stay those of the unwrapped model; parameter names become the wrapper's (peft's prefix).
    for group in groups:
        group.parameters = [(outer_names.get(id(parameter), name), parameter) for name, parameter in group.parameters]
    return groups


def _ancestor_module_names(parameter_name: str) -> list[str]:
    # "a.b.weight" -> ["a.b", "a", ""]: the owning module first, the root ("") last.
    parts = parameter_name.split(".")[:-1]
    return [".".join(parts[:end]) for end in range(len(parts), -1, -1)]


def _common_module_prefix(names: Iterable[str]) -> str:
    split = [name.split(".")[:-1] for name in names]
    if not split:
        return ""
    prefix = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def _joined_top_modules(names: list[str]) -> str:
    # ["blocks.11.attn.qkv.weight", "norm.weight"] -> "blocks.11+norm": numbered children keep their number.
    tops: list[str] = []
    for name in names:
        parts = name.split(".")
        top = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        if top not in tops:
            tops.append(top)
    return "+".join(tops)


def _unique(label: str, existing: dict) -> str:
    candidate, number = label, 2
    while candidate in existing:
        candidate, number = f"{label}_{number}", number + 1
    return candidate


# ---------------------------------------------------------------------------------------------------------------
# `finetune inspect MODEL`


def format_groups_table(groups: list[LayerGroup]) -> str:
    """Render the groups as a table: index, name, parameter count, modules (bottom group first)."""
    total = sum(group.num_parameters for group in groups) or 1
    rows = [("#", "group", "parameters", "share", "modules")]
    for index, group in enumerate(groups):
        modules = ", ".join(group.module_names[:3]) + (" ..." if len(group.module_names) > 3 else "")
        name = group.name + (" (head)" if group.is_head and group.name != "head" else "")
        rows.append((str(index), name, f"{group.num_parameters:,}", f"{group.num_parameters / total:.1%}", modules))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = []
    for row in rows:
        cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3].rjust(widths[3])]
        lines.append("  ".join(cells + [row[4]]).rstrip())
    lines.append(f"total: {sum(group.num_parameters for group in groups):,} parameters in {len(groups)} groups")
    return "\n".join(lines)


def inspect_main(argv: list[str]) -> int:
    """Run `finetune inspect MODEL`: load the model with a fresh head and print its layer groups as a table."""
    parser = argparse.ArgumentParser(prog="finetune inspect", description="Show a model's layer groups.")
    parser.add_argument(
        "model", help="Hub model id, local model folder, timm model as timm/NAME, or a bundled model (asset:minilm)."
    )
    parser.add_argument(
        "--task", choices=("text-classification", "image-classification"), default=None,
        help="Head to attach; default: guessed from the model's config (vision configs get image-classification).",
    )
    parser.add_argument("--num-labels", type=int, default=2, help="Number of classes of the attached head.")
    args = parser.parse_args(argv)
    if args.num_labels < 1:
        parser.error(f"--num-labels must be at least 1, got {args.num_labels}.")
    from .assets import AssetNotFoundError, resolve_path

    try:
        source = resolve_path(args.model)
    except AssetNotFoundError as error:
        print(f"finetune inspect: {error}", file=sys.stderr)
        return 1
    problem = _local_folder_problem(source)
    if problem is not None:
        print(f"finetune inspect: cannot load {args.model!r}: {problem}", file=sys.stderr)
        return 1
    try:
        model = _load_for_inspection(source, args.task, args.num_labels)
    except (OSError, ValueError, RuntimeError) as error:
        print(
            f"finetune inspect: cannot load {args.model!r}: {error}\nFix: give a local model folder, "
            "a Hub id (needs Hub access), or a timm model as timm/NAME.",
            file=sys.stderr,
        )
        return 1
    try:
        groups = discover_layer_groups(model)
    except LayerGroupError as error:
        print(f"finetune inspect: {error}", file=sys.stderr)
        return 1
    # The head is built for --num-labels classes, not read from the folder. An export of a 3-class run
    # therefore shows a 2-class head by default, and the header says which size the table counts.
    print(f"{type(model).__name__} from {args.model}, head for {args.num_labels} classes (set with --num-labels)")
    print(format_groups_table(groups))
    return 0


def _load_for_inspection(name: str, task: str | None, num_labels: int) -> nn.Module:
    import transformers

    if name.startswith("timm/") and not _is_local(name):
        import timm

        return timm.create_model(name.removeprefix("timm/"), pretrained=False, num_classes=num_labels)
    config = transformers.AutoConfig.from_pretrained(name)
    config.num_labels = num_labels  # also resets id2label, which a saved classifier sized for its own labels
    if task is None:
        task = "image-classification" if _looks_like_vision(config) else "text-classification"
    auto = (
        transformers.AutoModelForImageClassification
        if task == "image-classification"
        else transformers.AutoModelForSequenceClassification
    )
    # Weights do not change the groups, so build from the config and skip loading them.
    return auto.from_config(config)


def _local_folder_problem(source: str) -> str | None:
    """Return why a path-like `source` is not a model folder, or None when it is one or is a Hub or timm name.

    The rule is `models.check_model_source`'s: a leading `.`, `/` or `~`, more than one slash, or an existing
    path marks a folder. Without this, transformers reports such paths as invalid Hub repository ids.
    """
    from pathlib import Path

    if source.startswith("timm/") and not _is_local(source):
        return None
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).exists()
    if not looks_local or (Path(source).expanduser() / "config.json").is_file():
        return None
    if "efficientnet" in source:
        return (f"{source} is not a model folder (no config.json). Fix: run `finetune convert-efficientnet`, "
                "then inspect the folder it writes (runs/assets/efficientnet_lite0 by default).")
    return f"{source} is not a model folder (no config.json). Fix: give a save_pretrained folder or a Hub id."


def _is_local(name: str) -> bool:
    from pathlib import Path

    return Path(name).exists()


def _looks_like_vision(config) -> bool:
    return hasattr(config, "num_channels") or hasattr(config, "image_size") or config.model_type == "timm_wrapper"

