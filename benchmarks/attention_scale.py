"""How much signal do SAD / MAD / LGAD carry? The scale of the attention term against the task.

    python -m benchmarks.attention_scale                         # ERFNet at initialisation
    python -m benchmarks.attention_scale --student runs/gains/plain-lanes-s0/checkpoint.pt \\
        --label-teacher runs/gains/teacher-labels-lanes/checkpoint.pt

On one training batch of the synthetic lanes (ERFNet, the lane recipes' student), for each of
the recipes sad, mad, lgad and their published forms (``-upstream``): the weighted term's
value and its ratio to the task loss (cross-entropy, background weight 0.4), and the ratio of
the norms of their gradients with respect to the student's parameters — what the optimizer
actually sees. Also, per stage, how concentrated the upstream spatial softmax of Σ_c x² is:
its largest value and how many of the positions hold 90% of its mass (1 = an argmax
indicator: the map says where the peak is and nothing else).

What it showed (see the README's gains table for what the recipes then gain): on ERFNet at
48×48 the upstream softmax maps are saturated at every stage, and the upstream term at weight
0.1 is about 1% of the task loss; L2-normalised maps summed over positions (the ``sad``,
``mad``, ``lgad`` defaults) are scale-free and their term is a few percent to a few tens of
percent of the task loss at the same weight.
"""
from __future__ import annotations

import argparse

import torch

STAGES = ("layer1", "layer2", "layer3", "layer4")
RECIPES = ("sad-upstream", "sad", "mad-upstream", "mad", "lgad-upstream", "lgad")


def _grad_norm(value: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def softmax_concentration(raw_map: torch.Tensor) -> tuple[float, float]:
    """(mean largest value, mean number of positions holding 90% of the mass) of the spatial
    softmax of raw maps (N, H, W)."""
    probs = torch.softmax(raw_map.flatten(1).float(), dim=1)
    top = probs.max(dim=1).values.mean()
    cumulative = probs.sort(dim=1, descending=True).values.cumsum(dim=1)
    needed = (cumulative < 0.9).sum(dim=1).float() + 1
    return float(top), float(needed.mean())


def measure(student_weights: str | None, teacher_weights: str | None, *, batch: int = 8, seed: int = 0) -> dict:
    from kdops import attention_map
    from kdops.train.distiller import Distiller
    from kdops.train.pipeline import DataSpec, ModelSpec, load_checkpoint_file, seed_everything
    from kdops.train.recipes import get_recipe

    seed_everything(seed)
    train, _ = DataSpec("synthetic_lanes", None, (48, 48), 1200, 200, 0).build()
    images = torch.stack([train[i][0] for i in range(batch)])
    labels = torch.stack([train[i][1] for i in range(batch)])
    student = ModelSpec("erfnet").build(train.num_classes)
    if student_weights:
        student.load_state_dict(load_checkpoint_file(student_weights)["model"])
    teacher = ModelSpec("label_teacher").build(train.num_classes, train.ignore_index)
    if teacher_weights:
        teacher.load_state_dict(load_checkpoint_file(teacher_weights)["model"])
    class_weights = [0.4] + [1.0] * (train.num_classes - 1)

    rows = []
    stages = None
    for name in RECIPES:
        recipe = get_recipe(name)
        distiller = Distiller(student, num_classes=train.num_classes, recipe=recipe,
                              teacher=teacher if recipe.teacher else None, total_steps=1,
                              class_weights=class_weights)
        distiller.train()
        torch.manual_seed(seed)  # the same dropout draws for every recipe
        losses = distiller(images, labels, step=distiller.total_steps)  # every term on
        params = [p for p in student.parameters() if p.requires_grad]
        task = losses.terms["task"]
        term = sum(v for k, v in losses.terms.items() if k != "task")
        rows.append({"recipe": name, "task": task.item(), "term": term.item(), "ratio": (term / task).item(),
                     "grad_ratio": _grad_norm(term, params) / _grad_norm(task, params)})
        if stages is None:
            with torch.no_grad():
                out = student(images)
                stages = []
                for key in STAGES:
                    raw = attention_map(out[key], 2.0, "sum", "none")
                    stages.append((key, tuple(raw.shape[-2:]), *softmax_concentration(raw)))
        student.zero_grad(set_to_none=True)
    return {"rows": rows, "stages": stages, "teacher": teacher_maps(teacher, labels),
            "student_maps": teacher_maps(student, labels, images=images)}


def lane_mass(raw_map: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(share of an L2-normalised map's squared mass on lane pixels, share of the pixels that are
    lane) at the map's resolution (labels max-pooled to it): a map that carries lane
    information puts much more of its mass on the lanes than their area."""
    import torch.nn.functional as F

    lanes = (labels > 0).float().unsqueeze(1)
    lanes = F.adaptive_max_pool2d(lanes, raw_map.shape[-2:]).squeeze(1)
    a = raw_map.flatten(1).float()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    mass = (a ** 2 * lanes.flatten(1)).sum(1).mean()
    return float(mass), float(lanes.mean())


def teacher_maps(model, labels: torch.Tensor, images: torch.Tensor | None = None) -> list[tuple]:
    """Per stage of ``model`` (the label teacher reads ``labels``; a student reads ``images``):
    (stage, lane share of the map's mass, lane share of the pixels)."""
    from kdops import attention_map

    model.eval()
    with torch.no_grad():
        out = model(labels if images is None else images)
    model.train()
    return [(key, *lane_mass(attention_map(out[key], 2.0, "sum", "none"), labels)) for key in STAGES]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=None, help="ERFNet checkpoint (default: at initialisation)")
    parser.add_argument("--label-teacher", default=None, help="label teacher checkpoint (default: initialisation)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.student, args.label_teacher)
    print(f"student: {args.student or 'ERFNet at initialisation'}; label teacher: "
          f"{args.label_teacher or 'at initialisation'}")
    print("stage   map     softmax peak  positions for 90% of the mass")
    for key, size, top, needed in result["stages"]:
        print(f"{key:7s} {size[0]}x{size[1]:<5d} {top:12.3f}  {needed:6.1f} of {size[0] * size[1]}")
    for title, maps in (("label teacher", result["teacher"]), ("student", result["student_maps"])):
        print(f"{title}: share of each stage map's (L2) mass on lane pixels vs their share of the pixels")
        for key, mass, area in maps:
            print(f"  {key:7s} {mass:6.1%} of the mass on {area:6.1%} of the positions")
    print("recipe          task loss  weighted term  term/task  |grad term|/|grad task|")
    for row in result["rows"]:
        print(f"{row['recipe']:15s} {row['task']:9.4f}  {row['term']:13.3e}  {row['ratio']:9.2%}  {row['grad_ratio']:10.2%}")


if __name__ == "__main__":
    main()
