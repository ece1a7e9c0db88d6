"""Schedule controller: freezing, unfreezing, per-group rates and modes, on tiny models in a real AdamW loop."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers
from torch.optim.lr_scheduler import LambdaLR

from finetune.config import LayerGroupPattern, ScheduleConfig, StageConfig, TrainingConfig
from finetune.groups import discover_layer_groups
from finetune.schedule import ScheduleController, ScheduleError, resolve_train_spec

STEPS_PER_EPOCH = 3


def tiny_bert(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=50,
        max_position_embeddings=16, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_resnet(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return transformers.ResNetForImageClassification(config)


def text_batches(count: int, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, 50, (4, 8), generator=generator),
            "attention_mask": torch.ones(4, 8, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,), generator=generator),
        }
        for _ in range(count)
    ]


def image_batches(count: int, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(4, 3, 32, 32, generator=generator), "labels": torch.randint(0, 3, (4,), generator=generator)}
        for _ in range(count)
    ]


def linear_base(warmup: int, total: int):
    """Warm-up then linear decay to 0, as transformers' get_linear_schedule_with_warmup."""

    def base(step: int) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, (total - step) / (total - warmup))

    return base


class Harness:
    """A minimal optimizer-step loop with the call order the training loop uses."""

    def __init__(self, model, schedule: ScheduleConfig, training: TrainingConfig | None = None, total_steps: int = 9,
                 base=None):
        self.model = model
        self.training = training or TrainingConfig(learning_rate=1e-2, weight_decay=0.1)
        self.groups = discover_layer_groups(model)
        self.controller = ScheduleController(
            model, self.groups, schedule, self.training, STEPS_PER_EPOCH, total_steps
        )
        self.optimizer = torch.optim.AdamW(self.controller.optimizer_param_groups())
        self.scheduler = LambdaLR(self.optimizer, self.controller.lr_lambdas(base or (lambda step: 1.0)))
        self.step = 0
        self.records: list[dict] = []

    def run(self, batches: list[dict]) -> None:
        for batch in batches:
            record = self.controller.update(self.step, self.step // STEPS_PER_EPOCH)
            if record is not None:
                self.records.append(record)
            self.model.train()
            self.controller.set_modes(self.model)
            loss = self.model(**batch).loss
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            self.step += 1

    def group(self, name: str):
        return next(group for group in self.groups if group.name == name)


def snapshot(tensors) -> list[torch.Tensor]:
    return [tensor.detach().clone() for tensor in tensors]


def group_tensors(group) -> list[torch.Tensor]:
    buffers = [buffer for module in group.modules for buffer in module.buffers()]
    return [parameter for _, parameter in group.parameters] + buffers


def unchanged(before, after) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------------------------------------------------
# Parameter groups


def test_param_groups_hold_every_parameter_once():
    model = tiny_bert()
    harness = Harness(model, ScheduleConfig(preset="linear_probe"))
    in_optimizer = [id(p) for group in harness.optimizer.param_groups for p in group["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in model.parameters())


def test_param_groups_no_decay_for_bias_and_norm():
    model = tiny_bert()
    harness = Harness(model, ScheduleConfig())
    decay_of = {id(p): group["weight_decay"] for group in harness.optimizer.param_groups for p in group["params"]}
    assert decay_of[id(model.bert.encoder.layer[0].attention.self.query.bias)] == 0.0
    assert decay_of[id(model.bert.embeddings.LayerNorm.weight)] == 0.0
    assert decay_of[id(model.bert.encoder.layer[0].attention.self.query.weight)] == 0.1


def test_param_groups_same_objects_after_unfreeze():
    harness = Harness(tiny_bert(), ScheduleConfig(preset="freeze_then_unfreeze", freeze_epochs=1))
    before = [(id(group), id(group["params"]), [id(p) for p in group["params"]]) for group in harness.optimizer.param_groups]
    harness.run(text_batches(STEPS_PER_EPOCH + 1))
    after = [(id(group), id(group["params"]), [id(p) for p in group["params"]]) for group in harness.optimizer.param_groups]
    assert harness.records[-1]["stage"] == 1
    assert after == before


# ---------------------------------------------------------------------------------------------------------------
# Freezing


def test_linear_probe_frozen_checksums_unchanged():
    model = tiny_resnet()
    harness = Harness(model, ScheduleConfig(preset="linear_probe", train_bn=False))
    frozen = [tensor for group in harness.groups[:-1] for tensor in group_tensors(group)]
    head_before = snapshot(group_tensors(harness.groups[-1]))
    before = snapshot(frozen)
    harness.run(image_batches(3))
    assert unchanged(before, frozen)
    assert not unchanged(head_before, group_tensors(harness.groups[-1]))


def test_linear_probe_batchnorm_buffers_fixed():
    model = tiny_resnet()
    harness = Harness(model, ScheduleConfig(preset="linear_probe", train_bn=False))
    batchnorm = model.resnet.embedder.embedder.normalization
    mean, count = batchnorm.running_mean.clone(), batchnorm.num_batches_tracked.clone()
    harness.run(image_batches(2))
    assert torch.equal(batchnorm.running_mean, mean)
    assert torch.equal(batchnorm.num_batches_tracked, count)
    assert not batchnorm.training


def test_train_bn_updates_frozen_batchnorm():
    model = tiny_resnet()
    harness = Harness(model, ScheduleConfig(preset="linear_probe", train_bn=True))
    batchnorm = model.resnet.embedder.embedder.normalization
    mean, weight = batchnorm.running_mean.clone(), batchnorm.weight.detach().clone()
    convolution = model.resnet.embedder.embedder.convolution.weight
    conv_before = convolution.detach().clone()
    harness.run(image_batches(2))
    assert not torch.equal(batchnorm.running_mean, mean)
    assert not torch.equal(batchnorm.weight, weight)
    assert torch.equal(convolution, conv_before)


def test_frozen_parameters_have_no_grad():
    model = tiny_bert()
    harness = Harness(model, ScheduleConfig(preset="linear_probe"))
    harness.controller.update(0, 0)
    model(**text_batches(1)[0]).loss.backward()
    assert model.bert.encoder.layer[1].output.dense.weight.grad is None
    assert model.classifier.weight.grad is not None


def test_gradual_group_changes_after_its_step():
    # Unfreeze one group every 2 steps: the group below the head trains from step 2, so its weights
    # differ after the third optimizer step (step 3 done) and not after steps 1 and 2.
    model = tiny_bert()
    harness = Harness(model, ScheduleConfig(preset="gradual", unfreeze_every_steps=2))
    below_head = harness.groups[-2]
    tensors = [parameter for _, parameter in below_head.parameters]
    original = snapshot(tensors)
    harness.run(text_batches(2))
    assert unchanged(original, tensors)
    harness.run(text_batches(1, seed=5))
    assert not unchanged(original, tensors)


def test_gradual_unfreezes_top_down():
    harness = Harness(tiny_bert(), ScheduleConfig(preset="gradual", unfreeze_every_steps=1), total_steps=5)
    harness.run(text_batches(5))
    trained = [record["trainable_groups"] for record in harness.records]
    assert trained == [
        ["head"],
        ["neck", "head"],
        ["encoder.layer.1", "neck", "head"],
        ["encoder.layer.0", "encoder.layer.1", "neck", "head"],
        ["embeddings", "encoder.layer.0", "encoder.layer.1", "neck", "head"],
    ]


def test_backward_stops_below_trainable_group():
    # With the top encoder layer trainable, the lower layer's output needs no gradient, so autograd records
    # nothing below it.
    model = tiny_bert()
    harness = Harness(model, ScheduleConfig(preset="milestones", stages=[StageConfig(train="top:2")]))
    harness.controller.update(0, 0)
    outputs = {}
    for index in (0, 1):
        model.bert.encoder.layer[index].register_forward_hook(
            lambda module, args, output, index=index: outputs.__setitem__(index, output)
        )
    model(**text_batches(1)[0])
    assert not _first_tensor(outputs[0]).requires_grad
    assert _first_tensor(outputs[1]).requires_grad


def _first_tensor(output):
    return output if torch.is_tensor(output) else output[0]


def test_frozen_mode_train_keeps_batchnorm_eval():
    model = tiny_resnet()
    harness = Harness(model, ScheduleConfig(preset="linear_probe", frozen_mode="train", train_bn=False))
    harness.controller.update(0, 0)
    model.train()
    harness.controller.set_modes(model)
    assert model.resnet.encoder.stages[0].training
    assert not model.resnet.embedder.embedder.normalization.training


def test_resumed_scheduler_gives_same_rates():
    schedule = ScheduleConfig(preset="freeze_then_unfreeze", freeze_epochs=1, unfreeze_warmup_steps=3, layer_decay=0.7)
    training = TrainingConfig(learning_rate=1e-3)
    first = Harness(tiny_bert(), schedule, training, total_steps=9, base=linear_base(2, 9))
    first.run(text_batches(4))
    state = first.scheduler.state_dict()
    first.run(text_batches(1, seed=9))
    resumed = Harness(tiny_bert(), schedule, training, total_steps=9, base=linear_base(2, 9))
    resumed.scheduler.load_state_dict(state)
    resumed.step = 4
    resumed.run(text_batches(1, seed=9))
    assert rates_by_group(resumed.optimizer) == rates_by_group(first.optimizer)


def test_frozen_groups_in_eval_mode():
    model = tiny_bert()
    harness = Harness(model, ScheduleConfig(preset="linear_probe"))
    harness.controller.update(0, 0)
    model.train()
    harness.controller.set_modes(model)
    assert not model.bert.encoder.layer[0].attention.self.dropout.training
    assert not model.bert.embeddings.dropout.training
    assert model.dropout.training


def test_frozen_mode_train_keeps_dropout():
    model = tiny_bert()
    harness = Harness(model, ScheduleConfig(preset="linear_probe", frozen_mode="train"))
    harness.controller.update(0, 0)
    model.train()
    harness.controller.set_modes(model)
    assert model.bert.encoder.layer[0].attention.self.dropout.training


def test_unfrozen_group_returns_to_train_mode():
    model = tiny_bert()
    harness = Harness(model, ScheduleConfig(preset="freeze_then_unfreeze", freeze_epochs=1))
    harness.run(text_batches(STEPS_PER_EPOCH + 1))
    assert model.bert.encoder.layer[0].attention.self.dropout.training


def test_lora_frozen_weights_stay_frozen():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    groups = discover_layer_groups(model)
    controller = ScheduleController(model, groups, ScheduleConfig(), TrainingConfig(), STEPS_PER_EPOCH, 9)
    controller.update(0, 0)
    base_query = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    lora_a = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_A["default"].weight
    assert not base_query.requires_grad
    assert lora_a.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# Learning rates


def rates_by_group(optimizer) -> dict[str, float]:
    return {group["group_name"]: group["lr"] for group in optimizer.param_groups}


def test_peak_rates_follow_decay_and_head_multiplier():
    schedule = ScheduleConfig(layer_decay=0.5, head_lr_multiplier=10.0)
    harness = Harness(tiny_bert(), schedule, TrainingConfig(learning_rate=1e-3))
    assert rates_by_group(harness.optimizer) == {
        "embeddings": pytest.approx(1e-3 * 0.5**3),
        "encoder.layer.0": pytest.approx(1e-3 * 0.5**2),
        "encoder.layer.1": pytest.approx(1e-3 * 0.5),
        "neck": pytest.approx(1e-3),
        "head": pytest.approx(1e-2),
    }


def test_rates_at_steps_match_formula():
    # lr 1e-3, decay 0.5, head x10, base warm-up 2 steps then linear to 0 at step 9; head alone for one
    # epoch (3 steps), then all groups with a 2-step unfreeze warm-up.
    schedule = ScheduleConfig(
        preset="freeze_then_unfreeze", freeze_epochs=1, layer_decay=0.5, head_lr_multiplier=10.0, unfreeze_warmup_steps=2
    )
    training = TrainingConfig(learning_rate=1e-3, weight_decay=0.0)
    harness = Harness(tiny_bert(), schedule, training, total_steps=9, base=linear_base(2, 9))
    observed = {}
    for step in range(6):
        observed[step] = rates_by_group(harness.optimizer)
        harness.run(text_batches(1, seed=step))
    base = {0: 0.0, 1: 0.5, 2: 1.0, 3: 6 / 7, 4: 5 / 7, 5: 4 / 7}
    for step in range(6):
        assert observed[step]["head"] == pytest.approx(1e-2 * base[step]), step
    assert observed[2]["neck"] == 0.0
    assert observed[3]["neck"] == pytest.approx(1e-3 * base[3] * 0.5)
    assert observed[4]["neck"] == pytest.approx(1e-3 * base[4] * 1.0)
    assert observed[3]["embeddings"] == pytest.approx(1e-3 * 0.5**3 * base[3] * 0.5)
    assert observed[5]["encoder.layer.1"] == pytest.approx(1e-3 * 0.5 * base[5])


def test_stage_learning_rate_scales_groups():
    stages = [StageConfig(until_step=2, train="head"), StageConfig(train="all", learning_rate=2e-3)]
    schedule = ScheduleConfig(preset="milestones", stages=stages, layer_decay=0.5)
    harness = Harness(tiny_bert(), schedule, TrainingConfig(learning_rate=1e-3))
    harness.run(text_batches(2))
    assert rates_by_group(harness.optimizer)["encoder.layer.1"] == pytest.approx(2e-3 * 0.5)


def test_stage_record_fields():
    harness = Harness(tiny_bert(), ScheduleConfig(preset="linear_probe"), TrainingConfig(learning_rate=1e-3))
    record = harness.controller.update(0, 0)
    head_parameters = sum(p.numel() for _, p in harness.groups[-1].parameters)
    assert record == {
        "stage": 0,
        "name": "head",
        "trainable_groups": ["head"],
        "trainable_parameters": head_parameters,
        "frozen_batchnorm_parameters": 0,
        "learning_rates": {"embeddings": 0.0, "encoder.layer.0": 0.0, "encoder.layer.1": 0.0, "neck": 0.0, "head": 1e-3},
    }
    assert harness.controller.update(1, 0) is None


def test_stage_record_counts_frozen_batchnorm():
    harness = Harness(tiny_resnet(), ScheduleConfig(preset="linear_probe", train_bn=True))
    record = harness.controller.update(0, 0)
    head_parameters = sum(p.numel() for _, p in harness.groups[-1].parameters)
    batchnorm_parameters = sum(
        p.numel() for group in harness.groups[:-1] for name, p in group.parameters if "normalization" in name
    )
    assert batchnorm_parameters == 144
    assert record["frozen_batchnorm_parameters"] == batchnorm_parameters
    assert record["trainable_parameters"] == head_parameters + batchnorm_parameters


def test_resume_applies_stage_without_state():
    schedule = ScheduleConfig(preset="gradual", unfreeze_every_steps=2)
    model = tiny_bert()
    harness = Harness(model, schedule, total_steps=9)
    record = harness.controller.update(5, 1)
    assert record["trainable_groups"] == ["encoder.layer.1", "neck", "head"]
    assert not model.bert.encoder.layer[0].output.dense.weight.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# Stage specs and caching eligibility

GROUP_NAMES = ["embeddings", "encoder.layer.0", "encoder.layer.1", "neck", "head"]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("head", {4}),
        ("all", {0, 1, 2, 3, 4}),
        ("top:2", {2, 3, 4}),
        ("slice:1:3", {1, 2}),
        ("slice:-2:", {3, 4}),
        (["encoder.layer.*", "head"], {1, 2, 4}),
    ],
)
def test_train_spec_resolves(spec, expected):
    assert resolve_train_spec(spec, GROUP_NAMES) == frozenset(expected)


def test_train_spec_unknown_pattern_raises():
    with pytest.raises(ScheduleError, match="pooler"):
        resolve_train_spec("pooler", GROUP_NAMES)


def test_train_spec_top_too_many_raises():
    with pytest.raises(ScheduleError) as error:
        resolve_train_spec("top:9", GROUP_NAMES, key="schedule.stages.0.train")
    assert str(error.value) == (
        "schedule.stages.0.train = 'top:9' asks for 9 groups below the head, but there are 4 "
        "(embeddings, encoder.layer.0, encoder.layer.1, neck). Fix: use top:4 or 'all' to train every group."
    )


def test_milestones_unordered_raises():
    stages = [StageConfig(until_step=4, train="head"), StageConfig(until_step=2, train="top:1"), StageConfig(train="all")]
    with pytest.raises(ScheduleError, match="stages.1"):
        Harness(tiny_bert(), ScheduleConfig(preset="milestones", stages=stages))


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (ScheduleConfig(preset="linear_probe"), True),
        (ScheduleConfig(preset="linear_probe", frozen_mode="train"), False),
        (ScheduleConfig(preset="freeze_then_unfreeze", freeze_epochs=3), True),
        (ScheduleConfig(preset="freeze_then_unfreeze", freeze_epochs=1), False),
        (ScheduleConfig(preset="full"), False),
    ],
)
def test_backbone_frozen_throughout(schedule, expected):
    harness = Harness(tiny_bert(), schedule, total_steps=9)
    assert harness.controller.backbone_frozen_throughout() is expected


def test_backbone_frozen_throughout_train_bn():
    harness = Harness(tiny_resnet(), ScheduleConfig(preset="linear_probe", train_bn=True))
    assert harness.controller.backbone_frozen_throughout() is False


def test_user_patterns_drive_groups():
    model = tiny_bert()
    patterns = [
        LayerGroupPattern(name="bottom", modules=["bert.embeddings*", "bert.encoder.layer.0*"]),
        LayerGroupPattern(name="top", modules=["bert.encoder.*", "bert.pooler*"]),
        LayerGroupPattern(name="classifier", modules=["classifier"]),
    ]
    groups = discover_layer_groups(model, patterns)
    controller = ScheduleController(model, groups, ScheduleConfig(preset="linear_probe"), TrainingConfig(), 3, 9)
    controller.update(0, 0)
    assert model.classifier.weight.requires_grad
    assert not model.bert.encoder.layer[1].output.dense.weight.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.slow
def test_ddp_gradual_unfreeze_two_processes(tmp_path):
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    worker = Path(__file__).with_name("ddp_unfreeze_worker.py")
    out = tmp_path / "ddp.json"
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(worker), str(out)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["ddp"] == "DistributedDataParallel"
    assert result["records"] == [
        ["head"],
        ["neck", "head"],
        ["encoder.layer.1", "neck", "head"],
        ["encoder.layer.0", "encoder.layer.1", "neck", "head"],
    ]
    assert all(rank0 == rank1 for rank0, rank1 in result["checksums"])
    assert result["layer0_changed"] is True
    assert result["embeddings_changed"] is False
    assert result["max_diff_vs_reference"] < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Through the training recipe


def test_recipe_writes_stage_events(tmp_path):
    from tiny import run_recipe, tiny_config

    config = tiny_config(
        tmp_path, schedule={"preset": "gradual", "unfreeze_every_steps": 2, "unfreeze_warmup_steps": 2, "layer_decay": 0.5}
    )
    code, events = run_recipe(config)
    stages = [event for event in events if event["event"] == "stage"]
    assert code == 0
    assert [(event["step"], event["name"]) for event in stages] == [(0, "head"), (2, "top:1"), (4, "top:2"), (6, "top:3")]
    # 8 steps, linear decay without warm-up: base(2) = 0.75; the neck, unfrozen at step 2, is at 1/2 warm-up.
    assert stages[1]["learning_rates"]["neck"] == pytest.approx(1e-3 * 0.75 * 0.5)
    assert stages[1]["learning_rates"]["encoder.layer.1"] == 0.0


def test_recipe_unknown_stage_group_is_config_error(tmp_path):
    from tiny import run_recipe, tiny_config

    from finetune.runlog import EXIT_CONFIG_ERROR

    config = tiny_config(tmp_path, schedule={"preset": "milestones", "stages": [{"train": "pooler*"}]})
    code, events = run_recipe(config)
    assert code == EXIT_CONFIG_ERROR
    assert "'pooler*' names no layer group" in events[-1]["error"]
