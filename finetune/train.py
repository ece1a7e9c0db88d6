"""Fine-tuning recipe on Accelerate: setup, train, cleanup.

One process:     finetune train configs/minilm_rotten_tomatoes.yaml [KEY=VALUE ...]
Several:         accelerate launch --multi_gpu --num_processes 2 -m finetune.train --config CONFIG [KEY=VALUE ...]

Vocabulary: a *micro-batch* is one forward/backward pass; a *step* is one optimizer update, made after
`gradient_accumulation_steps` micro-batches. The last group of an epoch may be shorter: it still makes one step,
with its loss averaged over the micro-batches it has, and the LR scheduler is sized by these real step counts.
"""

from __future__ import annotations

import argparse
import fcntl  # NOTE: POSIX only, as are the Docker image and the signal handling this engine relies on.
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from . import runlog
from .checkpoint import (
    CheckpointManager,
    IncompatibleCheckpointError,
    build_fingerprint,
    check_compatible,
    read_checkpoint_record,
    resolve_resume,
)
from .config import ConfigError, RunConfig, load_config, save_config
from .data import PreparedData, prepare_data
from .data.common import DataError
from .export import export_model
from .features import CachedHead, collate_features, cache_head_inputs, should_cache_features
from .groups import discover_layer_groups
from .log import get_logger, setup_logging
from .metrics import METRIC_NAMES, compute_classification_metrics
from .models import load_model, load_processor
from .precision import resolve_mixed_precision
from .sampling import EpochBatchSampler, LengthSortedBatchSampler
from .schedule import ScheduleController
from .stopping import EarlyStopping, NonFiniteLossError, StopRequest, check_finite_loss, metric_greater_is_better

logger = get_logger(__name__)

# Misclassified validation images, saved as PNG in the run folder (relative to it) for the app's gallery.
MISCLASSIFIED_DIR = "misclassified"
MAX_MISCLASSIFIED_IMAGES = 48
# Lock file in the run folder. The main process keeps it locked while it trains and writes its process id into it.
RUN_DIR_LOCK_FILE = ".lock"


@dataclass
class TrainState:
    """Position of the run; saved in every checkpoint's trainer_state.json and restored on resume."""

    global_step: int = 0
    epoch: int = 0  # 0-based epoch in progress
    micro_batches_done: int = 0  # micro-batches of `epoch` already consumed (per process)
    # Running training metrics since the last evaluation, summed over processes at evaluation time.
    train_loss_sum: float = 0.0
    train_correct: int = 0
    train_seen: int = 0
    best_checkpoint: str | None = None
    early_stopping: dict = field(default_factory=dict)


class FineTuneRecipe:
    """One fine-tuning run. `run()` goes through setup, train and cleanup and returns the process exit code."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.training = config.training
        self.state = TrainState()
        self.status = "failed"
        self.error: str | None = None
        self.test_metrics: dict | None = None
        self.export_dir: Path | None = None
        self._last_eval_step = -1
        # Set by _setup_optimizer. Events written before it (the run_end of a data error) report epoch 0.
        self.micro_batches_per_epoch = 0

    # ------------------------------------------------------------------------------------------------------
    # Lifecycle

    def run(self) -> int:
        try:
            self.setup()
            self.status = self.train()
            self.finish()
        except (ConfigError, DataError, IncompatibleCheckpointError) as error:
            self.error = str(error)
            logger.error("%s", error)
            self._write_run_end()
            return runlog.EXIT_CONFIG_ERROR
        except NonFiniteLossError as error:
            self.error = str(error)
            logger.error("%s", error)
            self._write_run_end()
            return runlog.EXIT_FAILED
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
            self._write_run_end()
            raise
        finally:
            self.cleanup()
        self._write_run_end()
        return runlog.EXIT_STOPPED if self.status == "stopped" else runlog.EXIT_COMPLETED

    def setup(self) -> None:
        self._check_metric_name()
        self._setup_accelerator()
        self._setup_run_dir()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_dataloaders()
        self._prepare()
        self._setup_feature_cache()
        self._setup_checkpointing()

    def cleanup(self) -> None:
        stop_request = getattr(self, "stop_request", None)
        if stop_request is not None:
            stop_request.restore()
        run_dir_lock = getattr(self, "_run_dir_lock", None)
        if run_dir_lock is not None:
            run_dir_lock.close()  # closing the file releases the lock
            self._run_dir_lock = None
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            accelerator.end_training()

    # ------------------------------------------------------------------------------------------------------
    # Setup steps

    def _check_metric_name(self) -> None:
        # Validation events carry these metrics. A misspelt name would otherwise fail at the first evaluation,
        # after a whole epoch of training.
        known = (*METRIC_NAMES, "train_loss", "train_accuracy")
        if self.training.metric_for_best_model not in known:
            raise ConfigError([_unknown_metric_issue(self.training.metric_for_best_model, dict.fromkeys(known))])

    def _setup_accelerator(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # On hosts without GPUs, Accelerate 1.16 runs each launched process as its own world of size 1
            # (under both `accelerate launch --multi_gpu` and torchrun) unless ACCELERATE_USE_CPU is set.
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        self.mixed_precision = resolve_mixed_precision(self.training.mixed_precision)
        # The LR scheduler is stepped by hand once per optimizer step; Accelerate would otherwise step it
        # num_processes times per update, which breaks the step-based formulas of the schedule.
        self.accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            log_with=self.config.tracking.report_to or None,
            project_dir=str(self.config.run_dir),
            step_scheduler_with_optimizer=False,
        )
        set_seed(self.training.seed)
        self.is_main = self.accelerator.is_main_process

    def _setup_run_dir(self) -> None:
        self.run_dir = self.config.run_dir
        self.config_changes: list[str] = []
        # Every process creates the folder (exist_ok makes that safe), so a bad path raises the same error on
        # all of them instead of leaving the others waiting at the barrier below.
        _make_run_dir(self.run_dir)
        if self.is_main:
            self._run_dir_lock = _lock_run_dir(self.run_dir)
            self.config_changes = _config_changes(self.run_dir / runlog.CONFIG_FILE, self.config)
            save_config(self.config, self.run_dir / runlog.CONFIG_FILE)
            setup_logging(self.run_dir / runlog.LOG_FILE)
        self.accelerator.wait_for_everyone()
        self.run_log = runlog.RunLog(self.run_dir, enabled=self.is_main)
        logger.info("Run folder: %s (%d process(es), mixed precision %s)", self.run_dir,
                    self.accelerator.num_processes, self.mixed_precision)
        if self.config.tracking.report_to:
            self.accelerator.init_trackers(self.config.tracking.project_name, config=_flatten(self.config.model_dump(mode="json")))

    def _setup_data(self) -> None:
        # The processor is cheap; the data is read and checked before the weights load, so a data error costs
        # seconds, not a model download. The main process tokenises first and the others reuse its cache.
        self.processor = load_processor(self.config)
        with self.accelerator.main_process_first():
            self.data: PreparedData = prepare_data(self.config, self.processor)
        logger.info("Data: %d train, %d validation, %d test examples; classes: %s", len(self.data.train),
                    len(self.data.validation), len(self.data.test) if self.data.test is not None else 0,
                    ", ".join(self.data.label_names))

    def _setup_model(self) -> None:
        set_seed(self.training.seed)  # the new head's initial weights depend only on the seed
        self.model = load_model(self.config, self.data.label_names)
        if self.config.model.lora is not None:
            self.model = _apply_lora(self.model, self.config)
        self.groups = discover_layer_groups(self.model, self.config.model.layer_groups)

    def _setup_optimizer(self) -> None:
        num_batches = math.ceil(len(self.data.train) / self.training.per_device_train_batch_size)
        # Accelerate gives each process every num_processes-th batch (padding the last round with early batches).
        self.micro_batches_per_epoch = math.ceil(num_batches / self.accelerator.num_processes)
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / self.training.gradient_accumulation_steps)
        self.total_steps = self.steps_per_epoch * self.training.num_train_epochs
        if self.training.max_steps is not None:
            self.total_steps = min(self.total_steps, self.training.max_steps)
        self.warmup_steps = self.training.warmup_steps or math.ceil(self.training.warmup_ratio * self.total_steps)
        self._warn_ineffective_settings()

        self.controller = ScheduleController(
            self.model, self.groups, self.config.schedule, self.training, self.steps_per_epoch, self.total_steps
        )
        self.optimizer = torch.optim.AdamW(
            self.controller.optimizer_param_groups(),
            lr=self.training.learning_rate,
            betas=(self.training.adam_beta1, self.training.adam_beta2),
            eps=self.training.adam_epsilon,
            # One fused kernel for all groups: with a param group per layer group, the default foreach path
            # spent about 25% of an EfficientNet-Lite0 CPU step in the optimizer (78 ms fused off, 27 ms on).
            fused=True,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, self.controller.lr_lambdas(self._base_lr_factor)
        )

    def _warn_ineffective_settings(self) -> None:
        # Config validation accepts both. Judging warm-up needs the run's length, and an unused eval_steps is harmless.
        if self.training.warmup_steps and self.training.warmup_steps >= self.total_steps:
            logger.warning("training.warmup_steps is %d but the run has %d optimizer steps, so the learning rate never "
                           "reaches training.learning_rate. Fix: lower warmup_steps or use warmup_ratio.",
                           self.training.warmup_steps, self.total_steps)
        if self.training.eval_steps is not None and self.training.eval_strategy != "steps":
            logger.warning("training.eval_steps (%d) is ignored with eval_strategy %r. Fix: set eval_strategy: steps "
                           "to evaluate every eval_steps, or remove eval_steps.",
                           self.training.eval_steps, self.training.eval_strategy)

    def _base_lr_factor(self, step: int) -> float:
        """Return the LR multiplier of the base schedule at optimizer step `step`: warm-up, then decay."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.training.lr_scheduler_type == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.training.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    def _setup_dataloaders(self) -> None:
        self.train_sampler = EpochBatchSampler(
            len(self.data.train),
            self.training.per_device_train_batch_size,
            seed=self.training.seed,
            lengths=self.data.lengths if self.training.group_by_length else None,
        )
        # Dedicated generators: creating a DataLoader iterator then draws no number from the global torch RNG,
        # so dropout randomness continues identically after a mid-epoch resume.
        self.train_loader = DataLoader(
            self.data.train,
            batch_sampler=self.train_sampler,
            collate_fn=self.data.collate_fn,
            num_workers=self.training.dataloader_num_workers,
            generator=torch.Generator().manual_seed(self.training.seed),
            pin_memory=torch.cuda.is_available(),
        )
        self.validation_loader = self._eval_loader(self.data.validation)
        self.test_loader = self._eval_loader(self.data.test) if self.data.test is not None else None

    def _eval_loader(self, dataset) -> DataLoader:
        column_names = getattr(dataset, "column_names", None) or []
        if "input_ids" in column_names:
            # Texts sorted by length pad far less than texts in file order; outputs are mapped back by `order`.
            lengths = [len(ids) for ids in dataset["input_ids"]]
            sampler = LengthSortedBatchSampler(lengths, self.training.per_device_eval_batch_size)
            batching = {"batch_sampler": sampler}
        else:
            batching = {"batch_size": self.training.per_device_eval_batch_size, "shuffle": False}
        return DataLoader(
            dataset,
            **batching,
            collate_fn=self.data.collate_fn,
            num_workers=self.training.dataloader_num_workers,
            generator=torch.Generator().manual_seed(self.training.seed),
        )

    def _prepare(self) -> None:
        loaders = [self.train_loader, self.validation_loader] + ([self.test_loader] if self.test_loader else [])
        prepared = self.accelerator.prepare(self.model, self.optimizer, self.lr_scheduler, *loaders)
        self.model, self.optimizer, self.lr_scheduler, self.train_loader, self.validation_loader = prepared[:5]
        if self.test_loader is not None:
            self.test_loader = prepared[5]
        # After prepare, because sharding sets the real number of batches given to each process.
        if len(self.train_loader) != self.micro_batches_per_epoch:
            raise RuntimeError(
                f"expected {self.micro_batches_per_epoch} batches per process, the prepared loader has "
                f"{len(self.train_loader)}; the scheduler would be sized wrongly"
            )

    def _setup_feature_cache(self) -> None:
        """With the backbone frozen all run and inputs fixed, compute the head's inputs once and train on them."""
        self.cached_head = None
        use_cache = should_cache_features(
            self.config.schedule, self.controller, self.data.augmented, self.accelerator.num_processes
        )
        if not use_cache:
            return
        model = self.accelerator.unwrap_model(self.model)
        head = CachedHead.from_model(model, self.groups)
        started = time.perf_counter()
        # Train features in dataset order, so the usual epoch sampler picks the same batches as without caching.
        train_features = cache_head_inputs(model, head.module, self._eval_loader(self.data.train))
        self.train_loader = DataLoader(TensorDataset(*train_features), batch_sampler=self.train_sampler,
                                       collate_fn=collate_features)
        self.validation_loader = self._feature_loader(model, head, self.validation_loader)
        if self.test_loader is not None:
            self.test_loader = self._feature_loader(model, head, self.test_loader)
        self.cached_head = head
        logger.info("Cached the frozen backbone's features in %.1f s; the head trains on them",
                    time.perf_counter() - started)

    def _feature_loader(self, model, head, loader) -> DataLoader:
        features, labels = cache_head_inputs(model, head.module, loader)
        order = getattr(loader.batch_sampler, "order", None)
        if order is not None:  # back to dataset order, as `evaluate` expects of loaders without an order
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            features, labels = features[inverse], labels[inverse]
        return DataLoader(TensorDataset(features, labels), batch_size=self.training.per_device_eval_batch_size,
                          collate_fn=collate_features)

    def _forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean loss, logits [batch, num_labels]) from the model, or from the head on cached features."""
        if self.cached_head is not None:
            return self.cached_head.loss_and_logits(batch)
        outputs = self.model(**batch)
        return outputs.loss, outputs.logits

    def _setup_checkpointing(self) -> None:
        self.checkpoints = CheckpointManager(self.run_dir, self.accelerator, self.config.checkpoint.save_total_limit)
        self.metric_name = self.training.metric_for_best_model
        self.early_stopping = EarlyStopping(
            self.metric_name,
            metric_greater_is_better(self.metric_name, self.training.greater_is_better),
            self.training.early_stopping_patience,
            self.training.early_stopping_threshold,
        )
        self.stop_request = StopRequest()
        self.stop_request.install()
        self.resumed_from = resolve_resume(self.config.checkpoint.resume, self.run_dir)
        if self.resumed_from is None and self.checkpoints.list_complete():
            self._set_aside_previous_run()
        if self.resumed_from is not None and self.config_changes:
            logger.warning("Resuming %s with changed settings: %s. Set checkpoint.resume=never or another "
                           "output.run_dir to start over instead.", self.run_dir, "; ".join(self.config_changes[:10]))
        if self.resumed_from is not None:
            check_compatible(self.resumed_from, self._fingerprint())
            saved = self.checkpoints.load(self.resumed_from)
            self.state = TrainState(**saved["train_state"])
            self._rescale_data_position(read_checkpoint_record(self.resumed_from)["fingerprint"].get("world_size"))
            self._check_data_position()
            self.early_stopping.load_state_dict(self.state.early_stopping)
            logger.info("Resumed from %s at step %d (epoch %d, micro-batch %d)", self.resumed_from,
                        self.state.global_step, self.state.epoch + 1, self.state.micro_batches_done)
            if self.state.global_step >= self.total_steps:
                logger.warning("The checkpoint is at step %d, but this run ends at step %d, so no training step "
                               "runs. Fix: raise training.max_steps or training.num_train_epochs to train further.",
                               self.state.global_step, self.total_steps)

    def _set_aside_previous_run(self) -> None:
        """Move an earlier run's checkpoints, metrics and export into `previous-<time>/`, so a fresh start never
        resumes, exports or prunes another run's checkpoints, and readers see only this run's events."""
        if self.is_main:
            target = self.run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
            target.mkdir()
            for name in (runlog.CHECKPOINTS_DIR, runlog.METRICS_FILE, runlog.EXPORT_DIR):
                if (self.run_dir / name).exists():
                    (self.run_dir / name).rename(target / name)
            logger.info("Starting afresh in %s; moved the previous run's checkpoints and metrics to %s",
                        self.run_dir, target)
        self.accelerator.wait_for_everyone()
        self.checkpoints = CheckpointManager(self.run_dir, self.accelerator, self.config.checkpoint.save_total_limit)

    def _rescale_data_position(self, saved_world_size: int | None) -> None:
        """Convert the per-process micro-batch count of a checkpoint written by another number of processes.

        Accelerate deals an epoch's batches out in rounds of one per process, so `micro_batches_done *
        world_size` batches of the epoch were done. The new count is rounded down to a whole accumulation
        group, so up to one group of batches per process runs again; the result is not bit-identical.
        """
        current = self.accelerator.num_processes
        if not saved_world_size or saved_world_size == current or not self.state.micro_batches_done:
            return
        done = self.state.micro_batches_done * saved_world_size // current
        done -= done % self.training.gradient_accumulation_steps
        logger.warning("The checkpoint was written by %d process(es), this run has %d: continuing epoch %d at "
                       "micro-batch %d per process instead of %d.", saved_world_size, current,
                       self.state.epoch + 1, done, self.state.micro_batches_done)
        self.state.micro_batches_done = min(done, self.micro_batches_per_epoch)

    def _check_data_position(self) -> None:
        # A larger batch size or fewer training rows shorten the epoch. A position past its end would never
        # reach the epoch's last batch, so the loop would evaluate and checkpoint the same step forever.
        if self.state.micro_batches_done <= self.micro_batches_per_epoch:
            return
        raise IncompatibleCheckpointError(
            f"checkpoint {self.resumed_from} stopped after micro-batch {self.state.micro_batches_done} of epoch "
            f"{self.state.epoch + 1}, but an epoch of this config has {self.micro_batches_per_epoch} micro-batches "
            "per process (training.per_device_train_batch_size or the training data changed). Fix: resume with "
            "the batch size and data that wrote it, set checkpoint.resume: never, or use a new output.run_dir."
        )

    def _fingerprint(self) -> dict:
        return build_fingerprint(self.config, self.data.label_names, self.accelerator.num_processes, self.mixed_precision)

    # ------------------------------------------------------------------------------------------------------
    # Training

    def train(self) -> str:
        """Run epochs until the step budget, early stopping or a stop request ends the run; return the status."""
        self._write_run_start()
        self.progress = tqdm(total=self.total_steps, initial=self.state.global_step, desc="training",
                             unit="step", disable=not self.is_main, dynamic_ncols=True)
        status = "running"
        self._window_loss, self._window_batches = 0.0, 0
        # The epoch bound matters only after a resume with another number of processes: the steps done before
        # it were larger or smaller, so the step budget alone would end the run in the wrong epoch.
        while (status == "running" and self.state.global_step < self.total_steps
               and self.state.epoch < self.training.num_train_epochs):
            status = self._train_epoch()
            if self.state.micro_batches_done == self.micro_batches_per_epoch:
                self.state.epoch += 1
                self.state.micro_batches_done = 0
            if status in ("running", "done"):
                # Epoch end, or the step budget ran out mid-epoch: either way the run gets its evaluation.
                status = self._after_epoch(final=status == "done")
        self.progress.close()
        return "completed" if status in ("running", "done") else status

    def _train_epoch(self) -> str:
        self.train_sampler.set_epoch(self.state.epoch)
        # Accelerate's prepared loader re-seeds its batch sampler with its own count of finished passes each
        # time it is iterated. A mid-epoch resume runs the rest of that epoch through a skip loader, so the
        # count would then lag one epoch behind and replay an earlier epoch's order; setting it keeps both equal.
        if hasattr(self.train_loader, "set_epoch"):  # a plain DataLoader over cached features has none
            self.train_loader.set_epoch(self.state.epoch)
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(self.state.epoch)
        loader = self.train_loader
        if self.state.micro_batches_done:
            loader = self.accelerator.skip_first_batches(self.train_loader, self.state.micro_batches_done)
        accumulation = self.training.gradient_accumulation_steps
        # Only the throughput window restarts here, because evaluation and checkpoints between epochs are not
        # training time. The loss window runs on to the next train event, across the epoch end.
        self._window_start = time.perf_counter()
        self._window_samples = 0
        step_loss = torch.zeros((), device=self.accelerator.device)

        start = self.state.micro_batches_done
        for index, batch in enumerate(loader, start=start):
            # Groups count from where this pass starts. A resume starts on a group boundary unless
            # gradient_accumulation_steps changed since the checkpoint. Then the groups shift with the start, so
            # the first step after the resume still gets a whole group and its own stage update.
            group_start = index - (index - start) % accumulation
            group_size = min(accumulation, self.micro_batches_per_epoch - group_start)
            is_last_of_group = index + 1 == group_start + group_size
            if index == group_start:
                self._begin_step()
            step_loss += self._forward_backward(batch, group_size, sync=is_last_of_group)
            self.state.micro_batches_done = index + 1
            if not is_last_of_group:
                continue
            status = self._finish_step(step_loss)
            step_loss = torch.zeros((), device=self.accelerator.device)
            if status != "running":
                return status
        return "running"

    def _begin_step(self) -> None:
        change = self.controller.update(self.state.global_step, self.state.epoch)
        if change is not None:
            self.model = self.controller.after_change(self.accelerator, self.model)
            self._log_stage(change)
        self.model.train()
        self.controller.set_modes(self.accelerator.unwrap_model(self.model))
        if self.cached_head is not None:
            self.cached_head.train()

    def _forward_backward(self, batch: dict, group_size: int, sync: bool) -> torch.Tensor:
        # Gradients are all-reduced only on the last micro-batch of a group.
        context = nullcontext() if sync else self.accelerator.no_sync(self.model)
        with context:
            loss, logits = self._forward(batch)
            self.accelerator.backward(loss / group_size)
        labels = batch["labels"]
        with torch.no_grad():
            self.state.train_correct += int((logits.argmax(-1) == labels).sum())
            self.state.train_seen += labels.numel()
            self.state.train_loss_sum += float(loss.detach()) * labels.numel()
        self._window_samples += labels.numel()
        return loss.detach() / group_size

    def _finish_step(self, step_loss: torch.Tensor) -> str:
        # The mean over processes, so every rank takes the same decision about a non-finite loss.
        mean_loss = float(self.accelerator.reduce(step_loss, reduction="mean"))
        grad_norm = None
        if check_finite_loss(mean_loss, self.state.global_step + 1, self.training.nan_policy):
            if self.training.max_grad_norm is not None:
                # Accelerate unscales fp16 gradients before clipping, so the norm is in true units.
                grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.training.max_grad_norm))
            self.optimizer.step()
        else:
            logger.warning("Skipped step %d: non-finite loss %s", self.state.global_step + 1, mean_loss)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.progress.update(1)
        self._window_loss += mean_loss
        self._window_batches += 1
        if self.state.global_step % self.training.logging_steps == 0:
            self._log_train(grad_norm)
        return self._after_step()

    def _after_step(self) -> str:
        step = self.state.global_step
        improved = False
        if self.training.eval_strategy == "steps" and step % self.training.eval_steps == 0:
            improved = self._evaluate_validation()
        wants_checkpoint = bool(self.config.checkpoint.save_steps) and step % self.config.checkpoint.save_steps == 0
        if improved or wants_checkpoint:
            self._save_checkpoint(is_best=improved)
        if self._stop_requested():
            self._save_checkpoint(is_best=False)
            logger.info("Stopped on request at step %d; resume continues from %s", step, self.run_dir)
            return "stopped"
        if self.early_stopping.should_stop:
            return "early_stopped"
        if step >= self.total_steps:
            return "done"
        return "running"

    def _after_epoch(self, final: bool = False) -> str:
        improved = False
        evaluated_now = self._last_eval_step == self.state.global_step
        if not evaluated_now and (self.training.eval_strategy == "epoch" or (final and self.training.eval_strategy == "steps")):
            improved = self._evaluate_validation()
        if improved or self.config.checkpoint.save_every_epoch:
            self._save_checkpoint(is_best=improved)
        if self.early_stopping.should_stop:
            return "early_stopped"
        if self._stop_requested():
            return "stopped"
        return "running"

    def _stop_requested(self) -> bool:
        return self.stop_request.requested_anywhere(self.accelerator)

    # ------------------------------------------------------------------------------------------------------
    # Evaluation

    def _evaluate_validation(self) -> bool:
        """Evaluate on validation data, write the event with the running train metrics; return True on a new best."""
        metrics, _ = self.evaluate(self.validation_loader)
        self._last_eval_step = self.state.global_step
        totals = torch.tensor(
            [self.state.train_loss_sum, self.state.train_correct, self.state.train_seen],
            dtype=torch.float64, device=self.accelerator.device,
        )
        loss_sum, correct, seen = self.accelerator.reduce(totals, reduction="sum").tolist()
        if seen:
            metrics["train_loss"] = loss_sum / seen
            metrics["train_accuracy"] = correct / seen
        self.state.train_loss_sum, self.state.train_correct, self.state.train_seen = 0.0, 0, 0
        self._write_event("eval", split="validation", **metrics)
        self.accelerator.log({f"validation/{key}": value for key, value in metrics.items() if key != "num_examples"},
                             step=self.state.global_step)
        if self.metric_name not in metrics:
            raise ConfigError([_unknown_metric_issue(self.metric_name, metrics)])
        improved = self.early_stopping.update(metrics[self.metric_name], self.state.global_step)
        self.state.early_stopping = self.early_stopping.state_dict()
        logged_metrics = {name: metrics[name] for name in ("loss", "accuracy", self.metric_name)}
        logger.info("Step %d (epoch %.2f): validation %s%s", self.state.global_step, self._epochs_done(),
                    ", ".join(f"{name} {value:.4f}" for name, value in logged_metrics.items()),
                    " (best so far)" if improved else "")
        return improved

    @torch.no_grad()
    def evaluate(self, loader) -> tuple[dict, dict]:
        """Compute loss and classification metrics over `loader`, each example counted once across processes.

        Returns the metrics and the gathered `predictions`, `labels` and `logits` (main process has them all).
        """
        self.model.eval()
        if self.cached_head is not None:
            self.cached_head.eval()
        logits_list, labels_list, losses = [], [], []
        for batch in loader:
            logits = self._forward(batch)[1].float()
            per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
            # gather_for_metrics drops the duplicates Accelerate adds to even out the last round of batches.
            logits, labels, per_example = self.accelerator.gather_for_metrics((logits, batch["labels"], per_example))
            logits_list.append(logits.cpu())
            labels_list.append(labels.cpu())
            losses.append(per_example.cpu())
        logits = torch.cat(logits_list)
        labels = torch.cat(labels_list)
        sampler = getattr(loader, "batch_sampler", None)
        order = getattr(sampler, "order", None) or getattr(getattr(sampler, "batch_sampler", None), "order", None)
        if order is not None and len(order) == len(labels):
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            logits, labels = logits[inverse], labels[inverse]
        predictions = logits.argmax(-1)
        metrics = compute_classification_metrics(predictions.tolist(), labels.tolist(), len(self.data.label_names))
        metrics = {"loss": float(torch.cat(losses).mean()), **metrics, "num_examples": int(labels.numel())}
        return metrics, {"predictions": predictions, "labels": labels, "logits": logits}

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints, export and events

    def _save_checkpoint(self, is_best: bool) -> None:
        self.state.early_stopping = self.early_stopping.state_dict()
        path = self.checkpoints.save(
            self.state.global_step, {"train_state": self.state.__dict__}, is_best=is_best, fingerprint=self._fingerprint()
        )
        if is_best:
            self.state.best_checkpoint = str(path)
        self._write_event("checkpoint", path=str(path), is_best=is_best)

    def finish(self) -> None:
        """Load the weights to export (best or final), evaluate them on test data and export them."""
        if self.status == "stopped":
            return
        which = self.config.output.export
        best = self.checkpoints.best()
        if which == "best" and best is not None:
            _load_model_weights(best, self.accelerator.unwrap_model(self.model))
            logger.info("Loaded the best weights (step %s) from %s", self.early_stopping.best_step, best)
        elif which == "best":
            which = "final"
        metrics = {}
        validation_metrics, validation_outputs = self.evaluate(self.validation_loader)
        metrics["validation"] = _public(validation_metrics)
        if self.test_loader is not None:
            self.test_metrics, _ = self.evaluate(self.test_loader)
            metrics["test"] = _public(self.test_metrics)
            self._write_event("eval", split="test", **self.test_metrics)
            logger.info("Test accuracy %.4f, macro F1 %.4f (%d examples)", self.test_metrics["accuracy"],
                        self.test_metrics["f1_macro"], self.test_metrics["num_examples"])
        logger.info("Validation accuracy %.4f (%s weights)", validation_metrics["accuracy"], which)
        if self.is_main:
            self.export_dir = export_model(
                self.accelerator.unwrap_model(self.model), self.processor, self.config,
                self.run_dir / runlog.EXPORT_DIR, metrics, self.data.summary, which,
            )
            self._write_validation_predictions(validation_outputs)
        self.accelerator.wait_for_everyone()

    def _write_validation_predictions(self, outputs: dict) -> None:
        raw = self.data.raw_validation
        path = self.export_dir / "validation_predictions.jsonl"
        image_dir = self.run_dir / MISCLASSIFIED_DIR
        if image_dir.exists():
            shutil.rmtree(image_dir)  # Images of an earlier run would not match this run's predictions.
        saved_images = 0
        with open(path, "w", encoding="utf-8") as handle:
            for index, (label, prediction) in enumerate(zip(outputs["labels"].tolist(), outputs["predictions"].tolist())):
                record = {"index": index, "label": self.data.label_names[label],
                          "prediction": self.data.label_names[prediction]}
                if raw is not None and self.config.task == "text-classification":
                    record["text"] = raw[index][self.config.data.text_column]
                wants_image = label != prediction and saved_images < MAX_MISCLASSIFIED_IMAGES
                if raw is not None and self.config.task == "image-classification" and wants_image:
                    # The app shows these images; it reads them from the run folder only, never the data paths.
                    image_dir.mkdir(parents=True, exist_ok=True)
                    raw[index]["image"].convert("RGB").save(image_dir / f"{index}.png")
                    record["image"] = f"{MISCLASSIFIED_DIR}/{index}.png"
                    saved_images += 1
                handle.write(json.dumps(record) + "\n")

    def _write_run_start(self) -> None:
        self._write_event(
            "run_start",
            total_steps=self.total_steps,
            num_update_steps_per_epoch=self.steps_per_epoch,
            num_train_epochs=self.training.num_train_epochs,
            num_examples={"train": len(self.data.train), "validation": len(self.data.validation),
                          "test": len(self.data.test) if self.data.test is not None else 0},
            label_names=self.data.label_names,
            world_size=self.accelerator.num_processes,
            mixed_precision=self.mixed_precision,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            task=self.config.task,
            model=self.config.model.name_or_path,
        )

    def _log_train(self, grad_norm: float | None) -> None:
        elapsed = time.perf_counter() - self._window_start
        samples = self._window_samples * self.accelerator.num_processes
        values = {
            "loss": self._window_loss / max(1, self._window_batches),
            "learning_rate": self.lr_scheduler.get_last_lr()[-1],
            "samples_per_second": samples / elapsed if elapsed > 0 else 0.0,
            "grad_norm": grad_norm,
        }
        self._write_event("train", **values)
        self.accelerator.log({f"train/{k}": v for k, v in values.items() if v is not None}, step=self.state.global_step)
        self.progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}")
        self._window_start = time.perf_counter()
        self._window_loss, self._window_batches, self._window_samples = 0.0, 0, 0

    def _log_stage(self, change: dict) -> None:
        rates = ", ".join(f"{name} {rate:.2e}" for name, rate in change["learning_rates"].items())
        # The rates are those of this first step. A newly unfrozen group with a warm-up starts low and rises.
        batchnorm = change["frozen_batchnorm_parameters"]
        batchnorm_note = f", plus {batchnorm} in BatchNorm layers of frozen groups (schedule.train_bn)" if batchnorm else ""
        logger.info("Stage %d (%s) from step %d: %d trainable parameters in %s%s. Learning rates at this step: %s",
                    change["stage"], change["name"], self.state.global_step, change["trainable_parameters"] - batchnorm,
                    ", ".join(change["trainable_groups"]) or "no group", batchnorm_note, rates)
        self._write_event("stage", **change)

    def _epochs_done(self) -> float:
        # Setup may fail before the epoch length is known; the run_end event is still written then.
        return self.state.epoch + self.state.micro_batches_done / max(1, getattr(self, "micro_batches_per_epoch", 1))

    def _write_event(self, event: str, **fields) -> None:
        self.run_log.write(event, self.state.global_step, self._epochs_done(), **fields)

    def _write_run_end(self) -> None:
        run_log = getattr(self, "run_log", None)
        if run_log is None:
            return
        early = getattr(self, "early_stopping", None)
        fields = {
            "status": self.status if self.error is None else "failed",
            "best_metric": self.training.metric_for_best_model,
            "best_value": early.best_value if early else None,
            "best_step": early.best_step if early else None,
            "export_dir": str(self.export_dir) if self.export_dir else None,
        }
        if self.test_metrics:
            fields["test"] = _public(self.test_metrics)
        if self.error:
            fields["error"] = self.error
        self._write_event("run_end", **fields)
        self.run_log = None  # written once


def _load_model_weights(checkpoint: Path, model: torch.nn.Module) -> None:
    """Load the model weights of an Accelerate checkpoint folder into `model` (for exporting the best one)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. shared embeddings) are stored once, so they may be listed as missing.
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {name for name, _ in model.named_parameters()}
    untied_missing = [name for name in missing if name not in tied]
    if unexpected or untied_missing:
        raise RuntimeError(f"checkpoint {checkpoint} does not match the model: missing {untied_missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def _public(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "num_examples"}


def _make_run_dir(run_dir: Path) -> None:
    from .config import ConfigIssue

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError([ConfigIssue(
            "output.run_dir", str(run_dir), f"cannot be created ({type(error).__name__}: {error.strerror}).",
            "choose a writable folder path that is not an existing file.",
        )]) from error


def _lock_run_dir(run_dir: Path):
    """Take an exclusive lock on `run_dir/.lock` and return the open file that holds it.

    A second run in the same folder would resume from the first one's live checkpoints, prune them and mix
    both runs' events in metrics.jsonl. The OS drops the lock when the process ends, even on SIGKILL.
    """
    handle = open(run_dir / RUN_DIR_LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        from .config import ConfigIssue

        raise ConfigError([ConfigIssue(
            "output.run_dir", str(run_dir), f"is in use by another training run (process {owner}).",
            "wait for that run to end or stop it, or choose another output.run_dir.",
        )]) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _unknown_metric_issue(name: str, metrics: dict):
    from .config import ConfigIssue

    names = sorted(k for k in metrics if k != "num_examples")
    unprefixed = name.removeprefix("eval_")
    if unprefixed != name and unprefixed in names:
        # Trainer's name for the same metric. Mapping it silently would make two spellings of one setting.
        return ConfigIssue("training.metric_for_best_model", name, "is Trainer's name for a validation metric.",
                           f"use {unprefixed!r}: finetune names validation metrics without the eval_ prefix.")
    return ConfigIssue("training.metric_for_best_model", name, "is not a validation metric.",
                       f"use one of: {', '.join(names)}.")


def _config_changes(previous_file: Path, config: RunConfig) -> list[str]:
    """List `key: old -> new` for every setting that differs from the config saved in the run folder."""
    if not previous_file.is_file():
        return []
    import yaml

    try:
        previous = _flatten(yaml.safe_load(previous_file.read_text(encoding="utf-8")) or {}, scalars_only=False)
    except yaml.YAMLError:
        return ["config.yaml: unreadable"]
    current = _flatten(config.model_dump(mode="json"), scalars_only=False)
    # checkpoint.resume picks how this run starts, not how it trains. A run started with `never` and continued
    # with `auto` (as `finetune jobs resume` does) would otherwise warn that resuming changed a setting.
    keys = sorted((set(previous) | set(current)) - {"checkpoint.resume"})
    return [f"{key}: {previous.get(key)!r} -> {current.get(key)!r}" for key in keys if previous.get(key) != current.get(key)]


def _flatten(data: dict, prefix: str = "", scalars_only: bool = True) -> dict:
    """Flatten nested sections to dotted keys; trackers take only scalars, a config diff takes every value."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}.", scalars_only))
        elif not scalars_only or isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
    return flat


def _apply_lora(model: torch.nn.Module, config: RunConfig) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    lora = config.model.lora
    task_type = TaskType.SEQ_CLS if config.task == "text-classification" else None
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                             target_modules=lora.target_modules, task_type=task_type)
    return get_peft_model(model, peft_config)


# ----------------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="finetune train",
        description="Fine-tune a model from a YAML config. Under `accelerate launch -m finetune.train` it runs on "
        "every process Accelerate starts.",
    )
    parser.add_argument("config_path", nargs="?", help="YAML config file (or use --config).")
    parser.add_argument("--config", dest="config_option", help="YAML config file.")
    parser.add_argument("overrides", nargs="*", help="Dotted overrides, e.g. training.learning_rate=3e-5.")
    # Intermixed parsing, because plain parse_args stops collecting overrides at --config and then rejects
    # those after it (`KEY=VALUE --config CONFIG KEY=VALUE`).
    args = parser.parse_intermixed_args(argv)
    if args.config_option:
        if args.config_path and "=" not in args.config_path:
            parser.error(f"two config files given, {args.config_path} and --config {args.config_option}; give one")
        if args.config_path:
            args.overrides.insert(0, args.config_path)
        args.config_path = args.config_option
    if not args.config_path:
        parser.error("a config file is required: finetune train CONFIG [KEY=VALUE ...]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        config = load_config(args.config_path, args.overrides)
    except ConfigError as error:
        logger.error("%s", error)
        return runlog.EXIT_CONFIG_ERROR
    return FineTuneRecipe(config).run()


if __name__ == "__main__":
    sys.exit(main())
