"""Layer-group discovery on tiny random models of every supported architecture (built from configs)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import timm
import torch
import transformers as T

from finetune.config import LayerGroupPattern
from finetune.groups import LayerGroupError, discover_layer_groups, format_groups_table, inspect_main

TEXT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=50,
            max_position_embeddings=32, num_labels=3)
VIT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, image_size=32,
           patch_size=8, num_labels=3)

# name -> (builder, expected group names bottom to top); timm models are named by timm's group_matcher.
ARCHITECTURES = {
    "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(**TEXT)),
             ["embeddings", "encoder.layer.0", "encoder.layer.1", "neck", "head"]),
    "roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**TEXT)),
                ["embeddings", "encoder.layer.0", "encoder.layer.1", "head"]),
    "distilbert": (lambda: T.DistilBertForSequenceClassification(
        T.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=24, vocab_size=50, num_labels=3)),
        ["embeddings", "transformer.layer.0", "transformer.layer.1", "head"]),
    "deberta-v2": (lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(
        relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"], **TEXT)),
        ["embeddings", "encoder.layer.0", "encoder.layer.1", "head"]),
    "electra": (lambda: T.ElectraForSequenceClassification(T.ElectraConfig(embedding_size=8, **TEXT)),
                ["embeddings", "encoder.layer.0", "encoder.layer.1", "head"]),
    "xlm-roberta": (lambda: T.XLMRobertaForSequenceClassification(T.XLMRobertaConfig(**TEXT)),
                    ["embeddings", "encoder.layer.0", "encoder.layer.1", "head"]),
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**VIT)),
            ["embeddings", "layers.0", "layers.1", "neck", "head"]),
    "deit": (lambda: T.DeiTForImageClassification(T.DeiTConfig(**VIT)),
             ["embeddings", "layers.0", "layers.1", "neck", "head"]),
    "beit": (lambda: T.BeitForImageClassification(T.BeitConfig(**VIT)),
             ["embeddings", "layers.0", "layers.1", "neck", "head"]),
    "dinov2": (lambda: T.Dinov2ForImageClassification(T.Dinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8, num_labels=3)),
        ["embeddings", "encoder.layer.0", "encoder.layer.1", "neck", "head"]),
    "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3)),
        ["embeddings", "encoder.layers.0", "encoder.layers.1", "neck", "head"]),
    "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)),
        ["embeddings", "encoder.stages.0", "encoder.stages.1", "neck", "head"]),
    "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)),
        ["embeddings", "encoder.stages.0", "encoder.stages.1", "head"]),
    "efficientnet": (lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=32, num_labels=3)),
        ["embeddings"] + [f"encoder.blocks.{i}" for i in range(7)] + ["neck", "head"]),
    "mobilenet-v2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, num_labels=3)),
        ["embeddings"] + [f"layer.{i}" for i in range(16)] + ["neck", "head"]),
    "timm-resnet": (lambda: timm.create_model("test_resnet", num_classes=3),
                    ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "head"]),
    "timm-vit": (lambda: timm.create_model("test_vit", num_classes=3),
                 ["stem"] + [f"blocks.{i}" for i in range(5)] + ["blocks.5+norm", "head"]),
    "timm-efficientnet": (lambda: timm.create_model("test_efficientnet", num_classes=3),
                          ["stem", "blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.4+conv_head+bn2", "head"]),
    "timm-convnext": (lambda: timm.create_model("test_convnext", num_classes=3),
                      ["stem", "stages.0.blocks.0", "stages.1", "stages.1.blocks.1", "stages.2", "stages.2.blocks.1",
                       "stages.2.blocks.2", "stages.2.blocks.3", "stages.3", "stages.3.blocks.1", "head.norm", "head"]),
    "timm-wrapper": (lambda: T.TimmWrapperForImageClassification(
        T.TimmWrapperConfig(architecture="test_resnet", num_labels=3)),
        ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "head"]),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def built(request):
    torch.manual_seed(0)
    builder, expected = ARCHITECTURES[request.param]
    model = builder()
    return request.param, model, expected


def test_groups_cover_each_parameter_once(built):
    _, model, _ = built
    groups = discover_layer_groups(model)
    grouped = [id(p) for group in groups for _, p in group.parameters]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_groups_names_in_order(built):
    _, model, expected = built
    assert [group.name for group in discover_layer_groups(model)] == expected


def test_groups_head_is_last_and_only(built):
    _, model, _ = built
    groups = discover_layer_groups(model)
    assert [group.is_head for group in groups] == [False] * (len(groups) - 1) + [True]


def test_groups_modules_hold_only_their_parameters(built):
    # Equality fails only for parameters owned directly by a module shared with other groups (timm ViT's
    # cls_token on the model itself), so the modules' parameters are a subset.
    _, model, _ = built
    for group in discover_layer_groups(model):
        inside = {id(p) for module in group.modules for p in module.parameters()}
        assert inside <= {id(p) for _, p in group.parameters}, group.name
        assert inside, group.name


def test_timm_head_is_classifier():
    groups = discover_layer_groups(timm.create_model("test_resnet", num_classes=3))
    assert [p for p, _ in groups[-1].parameters] == ["fc.weight", "fc.bias"]


def test_timm_wrapper_prefixes_names():
    model = T.TimmWrapperForImageClassification(T.TimmWrapperConfig(architecture="test_resnet", num_labels=3))
    groups = discover_layer_groups(model)
    assert [p for p, _ in groups[-1].parameters] == ["timm_model.fc.weight", "timm_model.fc.bias"]


def test_peft_model_keeps_wrapper_names():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        T.BertForSequenceClassification(T.BertConfig(**TEXT)),
        peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    groups = discover_layer_groups(model)
    grouped = sorted(name for group in groups for name, _ in group.parameters)
    assert grouped == sorted(name for name, _ in model.named_parameters())
    assert any("lora_A" in name for name, _ in groups[1].parameters)


def test_single_layer_vit_groups():
    model = T.ViTForImageClassification(T.ViTConfig(**{**VIT, "num_hidden_layers": 1}))
    names = [group.name for group in discover_layer_groups(model)]
    assert names == ["embeddings", "layers.0", "neck", "head"]


def test_single_layer_bert_groups():
    model = T.BertForSequenceClassification(T.BertConfig(**{**TEXT, "num_hidden_layers": 1}))
    names = [group.name for group in discover_layer_groups(model)]
    assert names == ["embeddings", "encoder.layer.0", "neck", "head"]


def test_patterns_override_discovery():
    model = T.BertForSequenceClassification(T.BertConfig(**TEXT))
    patterns = [
        LayerGroupPattern(name="backbone", modules=["bert"]),
        LayerGroupPattern(name="classifier", modules=["classifier"]),
    ]
    groups = discover_layer_groups(model, patterns)
    assert [group.name for group in groups] == ["backbone", "classifier"]
    assert groups[0].module_names == ["bert"]


def test_patterns_missing_parameters_raise():
    model = T.BertForSequenceClassification(T.BertConfig(**TEXT))
    with pytest.raises(LayerGroupError, match="bert.pooler.dense.weight"):
        discover_layer_groups(model, [
            LayerGroupPattern(name="bottom", modules=["bert.embeddings*", "bert.encoder*"]),
            LayerGroupPattern(name="head", modules=["classifier"]),
        ])


def test_unknown_architecture_shows_yaml():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(LayerGroupError) as caught:
        discover_layer_groups(model)
    assert "Sequential" in str(caught.value)
    assert "layer_groups:" in str(caught.value)


def test_format_table_lists_counts():
    model = T.BertForSequenceClassification(T.BertConfig(**TEXT))
    table = format_groups_table(discover_layer_groups(model))
    assert table.splitlines()[-1] == f"total: {sum(p.numel() for p in model.parameters()):,} parameters in 5 groups"


def test_inspect_prints_groups(tmp_path, capsys):
    T.BertForSequenceClassification(T.BertConfig(**TEXT)).save_pretrained(tmp_path)
    assert inspect_main([str(tmp_path), "--num-labels", "4"]) == 0
    output = capsys.readouterr().out
    assert "encoder.layer.1" in output
    assert output.splitlines()[0] == (
        f"BertForSequenceClassification from {tmp_path}, head for 4 classes (set with --num-labels)"
    )


def test_inspect_missing_model_fails(tmp_path, capsys):
    assert inspect_main([str(tmp_path / "missing")]) == 1
    assert "cannot load" in capsys.readouterr().err


def test_inspect_folder_without_config(tmp_path, capsys):
    assert inspect_main([str(tmp_path)]) == 1
    assert f"{tmp_path} is not a model folder (no config.json)" in capsys.readouterr().err


def test_inspect_efficientnet_asset_names_convert(capsys):
    assert inspect_main(["asset:efficientnet_lite0"]) == 1
    assert "Fix: run `finetune convert-efficientnet`" in capsys.readouterr().err


def test_inspect_bundled_minilm(capsys):
    assert inspect_main(["asset:minilm"]) == 0
    output = capsys.readouterr().out
    assert "encoder.layer.5" in output
    assert "total: 22,713,986 parameters in 9 groups" in output


def test_inspect_unknown_asset_names_choices(capsys):
    assert inspect_main(["asset:nope"]) == 1
    error = capsys.readouterr().err
    assert "unknown asset 'asset:nope'" in error
    assert "asset:minilm" in error
