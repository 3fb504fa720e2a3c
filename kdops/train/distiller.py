"""The distiller: a student, an optional frozen teacher and a recipe's loss terms.

:class:`Distiller` is an ``nn.Module`` whose forward computes one training step's losses:
the task loss of the student (cross-entropy of the logits upsampled to the labels, plus
0.4 × the auxiliary head's) and every active recipe term. The teacher is frozen: its
parameters never require grad, it stays in eval mode whatever ``train()`` says, and it runs
under ``torch.no_grad()`` so no autograd graph is built through it. Adapters and projections
of the loss modules live in :attr:`Distiller.losses` and train with the student, except
those a term gives an optimizer of its own (APD's teacher projection), whose loss is
returned separately.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdops.losses._common import resize_to
from kdops.train.recipes import Recipe, RecipeContext, Term

INPUTS = ("image", "labels")


@dataclass
class StepLosses:
    """One step's losses: ``total`` (what the student's optimizer minimises), every
    weighted ``terms`` entry ("task", "cwd/logits", "apd/observation", ...), whose sum is
    ``total``, and the ``own`` losses of the terms with their own optimizer."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    own: dict[str, torch.Tensor] = field(default_factory=dict)


def _module_key(term_name: str) -> str:
    # nn.ModuleDict keys may not contain "."; "/" reads as in the logs.
    return term_name.replace(".", "_")


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of logits (N, K, h, w) bilinearly upsampled to the labels (N, H, W),
    optionally with per-class weights (K,)."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits.float(), labels, weight=class_weights, ignore_index=ignore_index)


class Distiller(nn.Module):
    """Student + frozen teacher + recipe terms.

    Args:
        student: a kdops segmentation model (dict of named features, ``feature_channels``).
        num_classes, ignore_index: of the data set; the student (and teacher) must predict
            ``num_classes`` classes.
        recipe: the distillation terms; None trains the student alone (teachers, baselines).
        teacher: the teacher model, required when the recipe's ``teacher`` is not None.
        total_steps: the run's length, for the terms' warm-up (``Term.start``).
        aux_weight: weight of the auxiliary head's cross-entropy (PSPNet/DeepLab: 0.4).
        class_weights: per-class weights of the cross-entropy, (K,) (lane detection: 0.4 for
            the background, as SCNN / ENet-SAD); None: unweighted.
        student_input: ``"image"``, or ``"labels"`` to train LGAD's label teacher.
        backend: kdops backend for every loss op (None: the default).

    Raises ``ValueError`` (naming the problem) when the teacher is missing or has another
    class count, or a term names a feature the models do not return.
    """

    def __init__(self, student: nn.Module, *, num_classes: int, ignore_index: int = 255,
                 recipe: Recipe | None = None, teacher: nn.Module | None = None, total_steps: int = 1,
                 aux_weight: float = 0.4, class_weights=None, student_input: str = "image",
                 backend: str | None = None):
        super().__init__()
        if student_input not in INPUTS:
            raise ValueError(f"student_input must be one of {INPUTS}, got {student_input!r}")
        if getattr(student, "num_classes", num_classes) != num_classes:
            raise ValueError(f"the student predicts {student.num_classes} classes but the data set has {num_classes}")
        self.student = student
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.recipe = recipe
        self.total_steps = max(1, int(total_steps))
        self.aux_weight = aux_weight
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if class_weights.shape != (num_classes,) or not bool((class_weights >= 0).all()):
                raise ValueError(f"class_weights must hold {num_classes} weights >= 0, got {class_weights.tolist()}")
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.student_input = student_input
        self.terms: tuple[Term, ...] = recipe.terms if recipe is not None else ()

        needs_teacher = recipe is not None and recipe.teacher is not None
        if needs_teacher and teacher is None:
            raise ValueError(f"recipe {recipe.name!r} needs a teacher ({recipe.teacher}) and none was given")
        if teacher is not None:
            if not needs_teacher:
                raise ValueError("a teacher was given but the recipe reads none")
            if getattr(teacher, "num_classes", num_classes) != num_classes:
                raise ValueError(
                    f"class-count mismatch: the teacher predicts {teacher.num_classes} classes, "
                    f"the student and the data set {num_classes}"
                )
            teacher.requires_grad_(False)
            teacher.eval()
        self.teacher = teacher
        self.teacher_input = recipe.teacher if needs_teacher else None

        student_channels = dict(student.feature_channels)
        teacher_channels = dict(teacher.feature_channels) if teacher is not None else {}
        for term in self.terms:
            for side, keys, channels in (("student", term.student, student_channels),
                                         ("teacher", term.teacher, teacher_channels)):
                missing = [k for k in keys if k not in channels]
                if missing:
                    raise ValueError(
                        f"term {term.name!r} reads {side} feature {missing[0]!r}, which the {side} "
                        f"does not return (it has {sorted(channels)})"
                    )
        context = RecipeContext(student_channels, teacher_channels, num_classes, ignore_index, backend)
        self.losses = nn.ModuleDict({_module_key(t.name): t.build(context) for t in self.terms})

    # -- modes and parameters ------------------------------------------------------------
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def own_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Per term with an own optimizer, the parameters it trains."""
        return {t.name: list(t.own_optimizer.params(self.losses[_module_key(t.name)]))
                for t in self.terms if t.own_optimizer is not None}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and adapter parameters: what the main optimizer trains."""
        own = {id(p) for params in self.own_parameters().values() for p in params}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def ignored_names(self) -> list[str]:
        """Parameter and buffer names DistributedDataParallel must leave alone: the frozen
        teacher (nothing to synchronise) and the own-optimizer parameters (reduced by hand)."""
        own = {id(p) for params in self.own_parameters().values() for p in params}
        names = [n for n, p in self.named_parameters() if id(p) in own or n.startswith("teacher.")]
        names += [n for n, _ in self.named_buffers() if n.startswith("teacher.")]
        return names

    def active_terms(self, step: int) -> list[Term]:
        return [t for t in self.terms if t.active(step, self.total_steps)]

    # -- the step ------------------------------------------------------------------------
    def student_forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.student(labels if self.student_input == "labels" else images)

    @torch.no_grad()
    def teacher_forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.teacher(labels if self.teacher_input == "labels" else images)

    def task_loss(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        loss = segmentation_loss(outputs["logits"], labels, self.ignore_index, self.class_weights)
        if "aux_logits" in outputs and self.aux_weight > 0:
            loss = loss + self.aux_weight * segmentation_loss(outputs["aux_logits"], labels, self.ignore_index,
                                                              self.class_weights)
        return loss

    def term_inputs(self, term: Term, s_out: dict, t_out: dict | None) -> tuple[list, list]:
        students = [s_out[k] for k in term.student]
        teachers = [t_out[k] for k in term.teacher] if term.teacher else []
        if term.resize_teacher and teachers:
            teachers = [resize_to(t, s) for s, t in zip(students, teachers)]
        return students, teachers

    def term_value(self, term: Term, students: list, teachers: list, labels: torch.Tensor):
        """The module's (unweighted by ``term.weight``) value: a scalar or a dict of scalars."""
        module = self.losses[_module_key(term.name)]
        if term.grouped:
            args = [students] + ([teachers] if term.teacher else [])
        else:
            args = [x for pair in zip(students, teachers) for x in pair] if teachers else list(students)
        if term.labels:
            args.append(labels)
        kwargs = term.kwargs(self.student, self.teacher) if term.kwargs is not None else {}
        return module(*args, **kwargs)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: int = 0) -> StepLosses:
        """images (N, 3, H, W), labels (N, H, W) int64 → :class:`StepLosses` at ``step``."""
        s_out = self.student_forward(images, labels)
        terms = {"task": self.task_loss(s_out, labels)}
        own = {}
        active = self.active_terms(step)
        t_out = self.teacher_forward(images, labels) if self.teacher is not None and active else None
        for term in active:
            students, teachers = self.term_inputs(term, s_out, t_out)
            value = self.term_value(term, students, teachers, labels)
            if isinstance(value, dict):
                for key, v in value.items():
                    terms[f"{term.name}/{key}"] = term.weight * v
            else:
                terms[term.name] = term.weight * value
            if term.own_optimizer is not None:
                module = self.losses[_module_key(term.name)]
                own[term.name] = term.own_optimizer.loss(module, students, teachers, labels)
        total = sum(v.float() for v in terms.values())
        return StepLosses(total, terms, own)

    # -- cost of the distillation losses -------------------------------------------------
    def profile_losses(self, images: torch.Tensor, labels: torch.Tensor, repeats: int = 5) -> dict:
        """Time and memory of the recipe's terms alone, forward + backward, on one batch.

        The student's and teacher's features are computed once (no grad) and fed to the
        terms as fresh leaves, so only the loss computation is measured. Returns
        ``{"ms": median ms per step, "saved_bytes": bytes saved for backward by the terms,
        "peak_bytes": extra peak CUDA memory (None on CPU)}``; empty dict without terms.
        """
        terms = [t for t in self.terms if t.weight > 0]
        if not terms:
            return {}
        was_training = self.training
        self.train()
        with torch.no_grad():
            s_out = self.student_forward(images, labels)
            t_out = self.teacher_forward(images, labels) if self.teacher is not None else None
        device = images.device
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        def run():
            leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in s_out.items()}
            total = 0.0
            for term in terms:
                students, teachers = self.term_inputs(term, leaves, t_out)
                value = self.term_value(term, students, teachers, labels)
                parts = value.values() if isinstance(value, dict) else [value]
                total = total + term.weight * sum(v.float() for v in parts)
            total.backward()

        times = []
        peak = None
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            if i == 0:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    run()
            else:
                run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - base
            if i > 0:  # the first run warms up (and counts the saved bytes)
                times.append(time.perf_counter() - start)
        self.zero_grad(set_to_none=True)
        self.train(was_training)
        times.sort()
        return {"ms": 1000 * times[len(times) // 2], "saved_bytes": saved[0], "peak_bytes": peak}
