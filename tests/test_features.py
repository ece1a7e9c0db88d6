"""Cached head inputs: equal to the uncached linear probe, and refused where caching would change results."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers as T
from torch.optim.lr_scheduler import LambdaLR

from finetune.config import ScheduleConfig, TrainingConfig
from finetune.features import (
    CachedHead, FeatureCacheError, cache_head_inputs, feature_dataloader, head_logits, should_cache_features,
)
from finetune.groups import discover_layer_groups
from finetune.schedule import ScheduleController

TEXT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=50,
            max_position_embeddings=32, num_labels=3)


def tiny_bert(**overrides) -> T.PreTrainedModel:
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(**{**TEXT, **overrides}))


def batches(count: int, length: int = 8, seed: int = 1, lengths: list[int] | None = None) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        size = lengths[index] if lengths else length
        out.append({
            "input_ids": torch.randint(1, 50, (4, size), generator=generator),
            "attention_mask": torch.ones(4, size, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,), generator=generator),
        })
    return out


def controller_for(model, schedule: ScheduleConfig) -> ScheduleController:
    return ScheduleController(model, discover_layer_groups(model), schedule, TrainingConfig(learning_rate=1e-2), 3, 9)


def optimizer_for(controller: ScheduleController):
    optimizer = torch.optim.AdamW(controller.optimizer_param_groups())
    return optimizer, LambdaLR(optimizer, controller.lr_lambdas(lambda step: 1.0))


def test_cached_training_matches_uncached():
    # Without dropout both runs see the same head inputs, so three AdamW steps give the same head.
    data = batches(3)
    uncached = tiny_bert(hidden_dropout_prob=0.0)
    controller = controller_for(uncached, ScheduleConfig(preset="linear_probe"))
    optimizer, scheduler = optimizer_for(controller)
    for step, batch in enumerate(data):
        controller.update(step, 0)
        uncached.train()
        controller.set_modes(uncached)
        uncached(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    cached = tiny_bert(hidden_dropout_prob=0.0)
    initial = cached.classifier.weight.detach().clone()
    controller = controller_for(cached, ScheduleConfig(preset="linear_probe"))
    optimizer, scheduler = optimizer_for(controller)
    head = CachedHead.from_model(cached, controller.groups)
    features, labels = cache_head_inputs(cached, head.module, data)
    head.train()
    for step, batch in enumerate(feature_dataloader(features, labels, batch_size=4)):
        controller.update(step, 0)
        loss, _ = head.loss_and_logits(batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert not torch.equal(cached.classifier.weight, initial)
    assert torch.allclose(cached.classifier.weight, uncached.classifier.weight, atol=1e-6)


def test_cache_shapes_and_label_order():
    model = tiny_bert()
    head = CachedHead.from_model(model, discover_layer_groups(model))
    data = batches(2)
    features, labels = cache_head_inputs(model, head.module, data)
    assert features.shape == (8, 16)
    assert torch.equal(labels, torch.cat([batch["labels"] for batch in data]))


def test_cache_restores_training_mode():
    model = tiny_bert()
    model.train()
    cache_head_inputs(model, model.classifier, batches(1))
    assert model.training


def test_cached_head_uses_top_level_dropout():
    model = tiny_bert()
    head = CachedHead.from_model(model, discover_layer_groups(model))
    assert head.dropout is model.dropout


def test_sequence_shaped_head_input_raises():
    torch.manual_seed(0)
    model = T.RobertaForSequenceClassification(T.RobertaConfig(**TEXT))
    head = CachedHead.from_model(model, discover_layer_groups(model))
    with pytest.raises(FeatureCacheError, match="varies"):
        cache_head_inputs(model, head.module, batches(2, lengths=[6, 9]))


def test_two_module_head_not_cached():
    torch.manual_seed(0)
    model = T.DistilBertForSequenceClassification(
        T.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=24, vocab_size=50, num_labels=3)
    )
    controller = controller_for(model, ScheduleConfig(preset="linear_probe"))
    assert should_cache_features(controller.schedule, controller, augmented=False) is False


@pytest.mark.parametrize(
    "schedule, augmented, processes, expected",
    [
        (ScheduleConfig(preset="linear_probe"), False, 1, True),
        (ScheduleConfig(preset="linear_probe"), True, 1, False),
        (ScheduleConfig(preset="linear_probe"), False, 2, False),
        (ScheduleConfig(preset="linear_probe", cache_features="false"), False, 1, False),
        (ScheduleConfig(preset="full"), False, 1, False),
    ],
)
def test_should_cache_auto(schedule, augmented, processes, expected):
    controller = controller_for(tiny_bert(), schedule)
    assert should_cache_features(schedule, controller, augmented, processes) is expected


def test_should_cache_true_raises_with_reason():
    schedule = ScheduleConfig(preset="linear_probe", cache_features="true")
    controller = controller_for(tiny_bert(), schedule)
    with pytest.raises(FeatureCacheError, match="augmented"):
        should_cache_features(schedule, controller, augmented=True)


def test_head_logits_match_model():
    model = tiny_bert()
    head = CachedHead.from_model(model, discover_layer_groups(model))
    data = batches(2)
    features, _ = cache_head_inputs(model, head.module, data)
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(**{k: v for k, v in batch.items() if k != "labels"}).logits for batch in data])
    assert torch.allclose(head_logits(head, features, batch_size=3), expected, atol=1e-6)
