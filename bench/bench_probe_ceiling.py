"""Measure how much a linear probe can get out of frozen MiniLM features, per pooling.

    python bench/bench_probe_ceiling.py                  # 1,000 train and 500 test reviews
    python bench/bench_probe_ceiling.py --samples 3000

The schedule benchmark found that head-only training on MiniLM stays at the majority class. This script
separates the features from the optimizer: it encodes Rotten Tomatoes reviews once with the frozen
all-MiniLM-L6-v2 encoder and fits scikit-learn's logistic regression (an exact convex solve, no learning-rate
or step budget) on three poolings of the last layer. The pooler output is what
`AutoModelForSequenceClassification` puts under its classifier, so it bounds what a linear probe or a
freeze-then-unfreeze head stage can reach.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.assets import minilm_model_dir, rotten_tomatoes_csv  # noqa: E402

BATCH_SIZE = 64
MAX_LENGTH = 128


def load_reviews(samples: int, seed: int) -> tuple[list[str], np.ndarray]:
    frame = pd.read_csv(rotten_tomatoes_csv())
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    frame = frame.sample(samples, random_state=seed)
    return frame["text"].tolist(), (frame["category"] == "fresh").to_numpy()


@torch.no_grad()
def encode(texts: list[str]) -> dict[str, np.ndarray]:
    """Return the pooler output, the [CLS] hidden state and the masked mean of the last layer, each (N, 384)."""
    folder = str(minilm_model_dir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    features: dict[str, list[torch.Tensor]] = {"pooler": [], "cls": [], "mean": []}
    for start in range(0, len(texts), BATCH_SIZE):
        batch = tokenizer(texts[start:start + BATCH_SIZE], padding=True, truncation=True, max_length=MAX_LENGTH,
                          return_tensors="pt")
        output = model(**batch)
        mask = batch["attention_mask"].unsqueeze(-1)  # (batch, tokens, 1)
        features["pooler"].append(output.pooler_output)
        features["cls"].append(output.last_hidden_state[:, 0])
        features["mean"].append((output.last_hidden_state * mask).sum(1) / mask.sum(1))
    return {name: torch.cat(parts).numpy() for name, parts in features.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1500, help="Number of reviews; the last third is the test set.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed for sampling the reviews.")
    parser.add_argument("--output", default="bench/results_probe_ceiling.json", help="JSON file for the results.")
    args = parser.parse_args()

    texts, labels = load_reviews(args.samples, args.seed)
    split = args.samples * 2 // 3
    results = {"train": split, "test": args.samples - split,
               "majority_accuracy": float(max(labels[split:].mean(), 1 - labels[split:].mean()))}
    for name, values in encode(texts).items():
        classifier = LogisticRegression(max_iter=2000).fit(values[:split], labels[:split])
        results[name] = {"test_accuracy": float(classifier.score(values[split:], labels[split:])),
                         "mean_feature_std": float(values.std(axis=0).mean())}
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print("| features | logistic regression test accuracy | mean std of a feature |")
    print("|---|---|---|")
    for name in ("pooler", "cls", "mean"):
        print(f"| {name} | {results[name]['test_accuracy']:.3f} | {results[name]['mean_feature_std']:.3f} |")
    print(f"| majority class | {results['majority_accuracy']:.3f} | |")


if __name__ == "__main__":
    main()
