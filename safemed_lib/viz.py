"""Figures of items and attacks: a sample grid of the benchmark, and the attack visualizer.

- :func:`sample_grid`: a grid of images, one row per modality (notebook 01).
- :func:`real_image_items`: real medical images that ship inside registry packages
  (scikit-image's fundus and histology images, pydicom's CT / MR / ultrasound test files and
  pydicom-data's chest X-ray), resized onto the model's grid and saved as PNG, each with a
  modality-recognition question in the benchmark's wording.
- :func:`run_attack`: generate on the clean image, attack it with :func:`attacks.pgd` on the
  answer loss (the same loss and rounding as the evaluation hook), generate on the adversarial
  image; returns an :class:`AttackView` with everything the panels show.
- :func:`attack_figure`: the static panels (clean image, amplified perturbation, adversarial
  image, loss per PGD step, the model's reasoning and answer before and after).
- :func:`attack_app`: the ipywidgets app (item, model, eps, steps, norm) that re-renders those
  panels on every change; headless, notebooks save :func:`attack_figure` instead.
"""
from __future__ import annotations

import io
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import attacks, data, prompts, synth
from .paths import resolve

# (name, modality, source kind, file): real images available offline in installed packages
REAL_SOURCES = (
    ("retina", "Fundus", "skimage", "retina.jpg"),
    ("ihc", "Microscopy", "skimage", "ihc.png"),
    ("ct_small", "CT", "dicom", "CT_small.dcm"),
    ("mr_small", "MRI", "dicom", "MR_small.dcm"),
    ("chest_cr", "X-Ray", "dicom", "RG1_UNCR.dcm"),
    ("us_rgb", "Ultrasound", "dicom", "examples_rgb_color.dcm"),
)


def _read_real(kind: str, name: str) -> np.ndarray:
    """A real image as uint8 RGB (H, W, 3). DICOM: first frame, 1-99th percentile window,
    MONOCHROME1 inverted, palette applied."""
    if kind == "skimage":
        import skimage

        path = Path(skimage.__file__).parent / "data" / name
        return np.asarray(Image.open(path).convert("RGB"))
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed (pydicom-data?)")
    ds = pydicom.dcmread(path)
    a, pi = ds.pixel_array, str(getattr(ds, "PhotometricInterpretation", ""))
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        a = apply_color_lut(a, ds)
    if getattr(ds, "NumberOfFrames", 1) not in (None, 1):
        a = a[0]
    a = np.asarray(a, np.float32)
    if a.ndim == 2:
        lo, hi = np.percentile(a, (1, 99))
        a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
        if pi == "MONOCHROME1":
            a = 1.0 - a
        a = np.repeat(a[..., None], 3, axis=-1) * 255
    return np.clip(a, 0, 255).astype(np.uint8)


def real_image_items(size: int, out_dir: str | Path = "data/demo_images", seed: int = 0,
                     n_options: int = 4) -> list[data.VQAItem]:
    """Real medical images from installed packages as VQA items on the model's grid.

    Each image is centre-cropped to a square, resized to ``size`` x ``size`` (bicubic) and
    cached as PNG under ``out_dir/<size>/``; its question is the benchmark's modality-recognition
    question with ``n_options`` options (the true modality and random others, order from ``seed``).
    Sources that cannot be read here are skipped with a warning.
    """
    if size % 28:
        raise ValueError(f"size must be a multiple of 28 (the model grid), got {size}")
    folder = resolve(out_dir) / str(size)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for name, modality, kind, file in REAL_SOURCES:
        order = rng.permutation(len(synth.MODALITIES))
        path = folder / f"{name}.png"
        if not path.is_file():
            try:
                a = _read_real(kind, file)
            except Exception as e:  # a missing optional file or decoder plugin
                warnings.warn(f"real image {kind}:{file} skipped: {e}")
                continue
            h, w = a.shape[:2]
            s = min(h, w)
            a = a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC).save(path)
        others = [synth.MODALITY_OPTION[synth.MODALITIES[i]] for i in order if synth.MODALITIES[i] != modality]
        options = others[: n_options - 1]
        pos = int(rng.integers(n_options))
        options.insert(pos, synth.MODALITY_OPTION[modality])
        items.append(data.VQAItem(question_id=f"real-{name}", dataset=f"{kind}:{file}", image_path=path,
                                  question=synth.TEMPLATES[synth.MR][0], options=options,
                                  answer=prompts.LETTERS[pos], modality=modality,
                                  question_type="Modality Recognition", source=f"{kind}:{file}"))
    return items


@dataclass
class AttackView:
    """One attack on one item: the images, the model's outputs before and after, the loss trace."""
    item: data.VQAItem
    model: str
    prompt: str
    eps: float
    alpha: float
    steps: int
    norm: str
    clean: torch.Tensor            # (3, H, W) in [0, 1]
    adv: torch.Tensor              # (3, H, W) in [0, 1]
    clean_output: str
    adv_output: str
    clean_pred: str | None
    adv_pred: str | None
    trace: torch.Tensor            # (restarts, steps + 1) loss at every PGD iterate
    target_kind: str = "answer"
    rounded: bool = True
    extras: dict = field(default_factory=dict)

    @property
    def delta(self) -> torch.Tensor:
        return self.adv - self.clean

    def summary(self) -> str:
        ok = lambda p: "correct" if p == self.item.answer else ("no valid answer" if p is None else "wrong")  # noqa: E731
        d = self.delta.flatten()
        return (f"{self.model} | {self.norm} eps={_eps_label(self.eps, self.norm)} steps={self.steps} | "
                f"truth {self.item.answer} | clean {self.clean_pred} ({ok(self.clean_pred)}) -> "
                f"adversarial {self.adv_pred} ({ok(self.adv_pred)}) | L-inf {d.abs().max() * 255:.1f}/255, "
                f"L2 {d.norm():.3f}")


def _eps_label(eps: float, norm: str) -> str:
    return f"{eps * 255:.3g}/255" if norm == "linf" else f"{eps:.3g}"


def run_attack(vlm, item: data.VQAItem, *, prompt: str, image_size: int | None, eps: float, steps: int = 10,
               norm: str = "linf", alpha: float | None = None, target: str = "auto", restarts: int = 1,
               seed: int = 0, rounding: bool = True, max_new_tokens: int = 128, clean_output: str | None = None,
               model_name: str = "model") -> AttackView:
    """Attack one item end to end, as ``attacks.pgd_perturb`` does in the evaluation, keeping the
    loss per step: generate on the clean image (or reuse ``clean_output``), run PGD on the answer
    loss, round to 8 bits (``rounding``), generate on the adversarial image."""
    x = data.load_images([item], size=image_size).to(vlm.device)
    if clean_output is None:
        clean_output = vlm.generate(x, [item], prompt=prompt, max_new_tokens=max_new_tokens)[0]
    targets, kinds = attacks.answer_targets(vlm, [item], prompt=prompt, target=target,
                                            clean_outputs={item.question_id: clean_output})
    loss_fn = attacks.vlm_answer_loss(vlm, [item], prompt=prompt, targets=targets)
    if alpha is None:
        alpha = attacks.default_alpha(eps, steps) if eps > 0 else 1.0
    if eps > 0:
        gen = torch.Generator(device=x.device).manual_seed(attacks.item_seed(seed, item.question_id))
        x_adv, trace = attacks.pgd(loss_fn, x, eps=eps, alpha=alpha, steps=steps, norm=norm, generator=[gen],
                                   restarts=restarts, return_trace=True)
        trace = trace[:, :, 0]
    else:
        x_adv = x.clone()
        with torch.no_grad():
            trace = loss_fn(x).view(1, 1)
    if rounding:
        x_adv = attacks.round_8bit_toward(x_adv, x)
    adv_output = vlm.generate(x_adv, [item], prompt=prompt, max_new_tokens=max_new_tokens)[0]
    n = len(item.options)
    with torch.no_grad():
        final = float(loss_fn(x_adv)[0])
    return AttackView(item=item, model=model_name, prompt=prompt, eps=float(eps), alpha=float(alpha),
                      steps=int(steps), norm=norm, clean=x[0].detach().cpu(), adv=x_adv[0].detach().cpu(),
                      clean_output=clean_output, adv_output=adv_output,
                      clean_pred=prompts.parse_answer(clean_output, n), adv_pred=prompts.parse_answer(adv_output, n),
                      trace=trace.detach().cpu(), target_kind=kinds[0], rounded=rounding,
                      extras={"loss_final": final})


def _img(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(1, 2, 0).clamp(0, 1).numpy()


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.fill(line, width) or " " for line in (text or "(empty)").splitlines())


def attack_figure(view: AttackView, *, width: float = 13.0):
    """The static panels of one attack as a matplotlib Figure: clean image, perturbation
    (amplified to the full grey range, 0 = mid grey), adversarial image, loss per PGD step, and the
    question with the model's output and answer before and after the attack."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width, width * 0.5), layout="constrained")
    gs = fig.add_gridspec(2, 4, height_ratios=[1.0, 0.6])
    axes = [fig.add_subplot(gs[0, i]) for i in range(4)]
    delta = view.delta
    amp = float(delta.abs().max())
    gain = 0.5 / amp if amp > 0 else 1.0
    axes[0].imshow(_img(view.clean))
    axes[0].set_title(f"clean: {view.clean_pred or 'no answer'} (truth {view.item.answer})")
    axes[1].imshow(_img(0.5 + gain * delta))
    axes[1].set_title(f"perturbation x{gain:.0f}" if amp > 0 else "perturbation (none)")
    axes[2].imshow(_img(view.adv))
    axes[2].set_title(f"adversarial: {view.adv_pred or 'no answer'}")
    for ax in axes[:3]:
        ax.set_xticks([]), ax.set_yticks([])
    ax = axes[3]
    for r, row in enumerate(view.trace):
        ax.plot(range(len(row)), row.numpy(), marker="o", ms=3, label=f"restart {r + 1}" if len(view.trace) > 1 else None)
    ax.set_xlabel("PGD iterate")
    ax.set_ylabel(f"answer NLL ({view.target_kind})")
    ax.set_title("loss per step")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    if len(view.trace) > 1:
        ax.legend(fontsize=7)
    text_ax = fig.add_subplot(gs[1, :])
    text_ax.axis("off")
    it = view.item
    options = ", ".join(f"{prompts.LETTERS[i]}) {o}" for i, o in enumerate(it.options))
    left = (f"{it.question_id} [{it.modality} / {it.question_type}]\n{_wrap(it.question, 60)}\n"
            f"{_wrap(options, 60)}\ntruth: {it.answer}\n\nCLEAN output -> {view.clean_pred}\n"
            f"{_wrap(view.clean_output, 60)}")
    right = f"ADVERSARIAL output -> {view.adv_pred}\n{_wrap(view.adv_output, 60)}"
    text_ax.text(0.0, 1.0, left, va="top", family="monospace", fontsize=8)
    text_ax.text(0.52, 1.0, right, va="top", family="monospace", fontsize=8,
                 color="C3" if view.adv_pred != it.answer else "black")
    fig.suptitle(f"{view.model} ({view.prompt}) | PGD {view.norm} eps={_eps_label(view.eps, view.norm)}, "
                 f"step {_eps_label(view.alpha, view.norm)}, {view.steps} steps"
                 f"{', 8-bit rounded' if view.rounded else ''}")
    return fig


def figure_png(fig, dpi: int = 80) -> bytes:
    """A figure as PNG bytes (then closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


LINF_EPS = (0, 1, 2, 4, 8, 16)          # in 1/255
L2_EPS = (0.0, 0.25, 0.5, 1.0, 2.0)


def _eps_options(norm: str) -> list[tuple[str, float]]:
    if norm == "linf":
        return [(f"{e}/255", e / 255) for e in LINF_EPS]
    return [(f"{e:g}", float(e)) for e in L2_EPS]


def attack_app(models: dict, items: Sequence[data.VQAItem], *, image_size: int | None, steps: int = 10,
               eps: float = 8 / 255, norm: str = "linf", seed: int = 0, max_new_tokens: int = 128):
    """The interactive attack visualizer (an ``ipywidgets.VBox``).

    ``models``: display name -> ``(vlm, prompt)`` (e.g. the think and nothink SFT baselines).
    ``items``: the choices (benchmark items and :func:`real_image_items`). Every change of item,
    model, eps, steps or norm re-runs :func:`run_attack` and redraws :func:`attack_figure` into an
    image widget; the latest view is ``app.view``, a one-line summary is in ``app.status``.
    Clean outputs are cached per (model, item).
    """
    import ipywidgets as W

    items = list(items)
    if not items or not models:
        raise ValueError("attack_app needs at least one item and one model")
    style = {"description_width": "70px"}
    item_w = W.Dropdown(options=[(f"{it.question_id} [{it.modality}] {it.question[:50]}", i)
                                 for i, it in enumerate(items)], value=0, description="item",
                        layout=W.Layout(width="520px"), style=style)
    model_w = W.Dropdown(options=list(models), description="model", style=style)
    norm_w = W.ToggleButtons(options=[("L-inf", "linf"), ("L2", "l2")], value=norm, description="norm", style=style)
    opts = _eps_options(norm)
    start = min(opts, key=lambda o: abs(o[1] - eps))[1]
    eps_w = W.SelectionSlider(options=opts, value=start, description="eps", continuous_update=False, style=style)
    steps_w = W.IntSlider(value=steps, min=1, max=40, description="steps", continuous_update=False, style=style)
    image_w = W.Image(format="png", layout=W.Layout(width="100%"))
    status = W.HTML(value="")
    cache: dict[tuple[str, str], str] = {}
    app = W.VBox([W.HBox([item_w, model_w]), W.HBox([norm_w, eps_w, steps_w]), status, image_w])
    app.add_class("safemed-attack-app")
    for w, name in ((item_w, "item"), (model_w, "model"), (norm_w, "norm"), (eps_w, "eps"), (steps_w, "steps"),
                    (image_w, "image")):
        w.add_class(f"safemed-{name}")  # stable hooks for the browser test

    def refresh(*_):
        name = model_w.value
        vlm, prompt = models[name]
        it = items[item_w.value]
        status.value = "<i>attacking ...</i>"
        view = run_attack(vlm, it, prompt=prompt, image_size=image_size, eps=eps_w.value, steps=steps_w.value,
                          norm=norm_w.value, seed=seed, max_new_tokens=max_new_tokens,
                          clean_output=cache.get((name, it.question_id)), model_name=name)
        cache[(name, it.question_id)] = view.clean_output
        app.view = view
        image_w.value = figure_png(attack_figure(view))
        status.value = f"<code class='safemed-status'>{view.summary()}</code>"

    def on_norm(change):
        new = _eps_options(change["new"])
        eps_w.unobserve(refresh, "value")  # one redraw for the new options, not two
        eps_w.options = new
        eps_w.value = new[min(len(new) - 1, 3)][1]
        eps_w.observe(refresh, "value")
        refresh()

    for w in (item_w, model_w, steps_w, eps_w):
        w.observe(refresh, "value")
    norm_w.observe(on_norm, "value")
    app.controls = dict(item=item_w, model=model_w, norm=norm_w, eps=eps_w, steps=steps_w, image=image_w,
                       status=status)
    app.status = status
    app.refresh = refresh
    refresh()
    return app


def sample_grid(items: Sequence, per_modality: int = 6, size: int | None = None, seed: int = 0):
    """A matplotlib figure: one row per modality, ``per_modality`` images each (distinct images,
    picked with ``seed``), titled with the answer of one of their questions."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    by_mod: dict[str, dict] = {}
    for it in items:
        by_mod.setdefault(it.modality, {}).setdefault(str(it.image_path), it)
    mods = [m for m in synth.MODALITIES if m in by_mod]
    if not mods:
        raise ValueError("sample_grid: no items")
    fig, axes = plt.subplots(len(mods), per_modality, figsize=(1.6 * per_modality, 1.75 * len(mods)),
                             squeeze=False)
    for r, m in enumerate(mods):
        imgs = list(by_mod[m].values())
        pick = [imgs[i] for i in sorted(rng.permutation(len(imgs))[:per_modality])]
        for c in range(per_modality):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(pick):
                x = data.load_image(pick[c].image_path, size)
                ax.imshow(x.permute(1, 2, 0).numpy())
                ax.set_title(pick[c].answer_text[:22], fontsize=7)
        axes[r, 0].text(-0.08, 0.5, m, transform=axes[r, 0].transAxes, ha="right", va="center",
                        fontsize=9)
    fig.tight_layout()
    return fig
