"""A trained ensemble as one folder: ``retina-export`` writes it, :meth:`Bundle.open` reads it back, checked.

    retina-export --runs runs/EXP --out NAME.retina [--stack runs/EXP/stack] [--data shards/NAME]

The bundle (format ``retina-bundle``, version :data:`BUNDLE_VERSION`)::

    NAME.retina/
      manifest.json                 format, version, one entry per other file: sha256 and bytes
      bundle.json                   classes (all 11; those the meta-learner predicts; those the training data
                                    labelled), the backbones in feature order with their fold files and resolved
                                    preprocessing, the training dataset's pack options, library versions
      models/MODEL/config.json      the backbone's resolved run config (as it trained)
      models/MODEL/fold{k}.safetensors   every fold model's weights (a plain state dict)
      meta/meta.json, meta/meta_model*.ubj   the meta-learner as ``retina-stack`` saved it (XGBoost UBJSON; feature
                                    order, classes, per-class thresholds chosen on the meta-OOF)

Reading never unpickles (JSON, safetensors, XGBoost UBJSON only); every file's sha256 is checked against the
manifest before anything is used; an unknown format version is refused naming ``manifest.json``; a missing fold
model is refused naming it (no silent partial ensembles). Exporting refuses a run whose backbones lack a fold model
of the training dataset's k folds, or whose backbones differ from the meta-learner's features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from retina_io.cli import console_main, setup_logging
from retina_io.dataset import PackedDataset
from retina_io.errors import RetinaError
from retina_io.fsutil import require_out_folder, tmp_path
from retina_io.schema import CLASSES, split_feature_name
from retina_train.config import RunConfig, from_dict, to_dict

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "retina-bundle"
BUNDLE_VERSION = 1
KNOWN_VERSIONS = (1,)
LIBRARIES = ("torch", "torchvision", "timm", "xgboost", "safetensors", "numpy", "polars", "pillow", "retina")


class BundleError(RetinaError, RuntimeError):
    """A bundle that cannot be written or read as asked; the message names the file at fault."""


@dataclass
class BundleBackbone:
    """One backbone of a bundle: its name in the features (``MODEL__CLASS``), run config, fold weights and the
    preprocessing it trained with (image size, mean/std, local contrast, eval crop, channels-last preference)."""

    name: str
    cfg: RunConfig
    weights: list[Path]
    preprocess: dict

    def run(self, device: str = "cpu"):
        """A :class:`retina_train.inference.BackboneRun` over the bundle's fold files, on ``device``."""
        from retina_train.inference import BackboneRun
        from retina_train.settings import resolve_settings

        return BackboneRun(self.name, self.cfg, resolve_settings(self.cfg, device), list(self.weights))

    def loader_fields(self) -> dict:
        """The :class:`retina_io.loader.LoaderConfig` fields the bundle fixes (what training used)."""
        p = self.preprocess
        return {"image_size": int(p["image_size"]), "mean": tuple(p["mean"]), "std": tuple(p["std"]),
                "local_contrast": float(p["local_contrast"]), "eval_crop": float(p["eval_crop"])}  # fmt: skip


@dataclass
class Bundle:
    root: Path
    info: dict  # bundle.json
    backbones: list[BundleBackbone] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """The classes the meta-learner predicts (its output order)."""
        return list(self.info["predicted_classes"])

    @property
    def pack_options(self) -> dict:
        """How the training images were packed (``resize``, ``quality``): new images are prepared the same way."""
        return dict(self.info["training_data"]["pack"])

    def meta_learner(self):
        """The meta-learner (XGBoost UBJSON + meta.json, checked when the bundle was opened)."""
        from retina_train.stack import StackError, load_meta_learner

        try:
            return load_meta_learner(self.root / "meta")
        except StackError as exc:
            raise BundleError(f"bundle {self.root}: {exc}") from exc

    @classmethod
    def open(cls, root: Path) -> Bundle:
        """Open and check a bundle folder: format version, every checksum, every fold model."""
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"--bundle {root} is not a folder (retina-export writes NAME.retina/)")
        listed, version = _check_manifest(root)
        info = _read_json(root / "bundle.json")
        if info.get("format") != BUNDLE_FORMAT or info.get("version") != version:
            raise BundleError(f"{root / 'bundle.json'}: format {info.get('format')!r} version {info.get('version')!r}"
                              f" does not match manifest.json ({BUNDLE_FORMAT} v{version})")  # fmt: skip
        try:
            backbones = _backbones(root, info, listed)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, RetinaError):
                raise
            raise BundleError(f"{root / 'bundle.json'} is not a valid bundle description ({exc!r}); "
                              "export the bundle again") from None  # fmt: skip
        _warn_versions(info.get("versions", {}))
        return cls(root, info, backbones)


def _backbones(root: Path, info: dict, listed: set[str]) -> list[BundleBackbone]:
    """The backbones bundle.json describes, each fold model and config listed (so checked) in manifest.json, and
    the same backbones as the meta-learner's features."""
    backbones = []
    for b in info["backbones"]:
        missing = [f for f in b["folds"] if f not in listed]
        if missing:
            raise BundleError(f"bundle {root}: fold model(s) {missing} of backbone {b['name']} are missing from "
                              "manifest.json; the bundle is incomplete, export it again")  # fmt: skip
        cfg_path = root / b["config"]
        if b["config"] not in listed:
            raise BundleError(f"{cfg_path} is not in manifest.json; export the bundle again")
        cfg = from_dict(_read_json(cfg_path), where=str(cfg_path))
        backbones.append(BundleBackbone(b["name"], cfg, [root / f for f in b["folds"]], b["preprocess"]))
    meta = [f for f in info["meta_files"] if f not in listed]
    if meta or "meta/meta.json" not in info["meta_files"]:
        raise BundleError(f"bundle {root}: meta-learner file(s) {meta or ['meta/meta.json']} are missing from "
                          "manifest.json; export the bundle again")  # fmt: skip
    features = _read_json(root / "meta" / "meta.json").get("feature_columns", [])
    models = sorted({split_feature_name(c)[0] for c in features})
    if models != [b.name for b in backbones]:
        raise BundleError(f"bundle {root}: meta/meta.json was trained on backbones {models}, bundle.json holds "
                          f"{[b.name for b in backbones]}; export the bundle again")  # fmt: skip
    return backbones


# ------------------------------------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} is missing; not a complete retina bundle (retina-export writes it)") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{path} does not hold a JSON object")
    return doc


def _safe_relpath(root: Path, rel: str, manifest: Path) -> Path:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or rel in ("manifest.json",):
        raise BundleError(f"{manifest}: file entry {rel!r} is not a plain path inside the bundle")
    return root / p


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_manifest(root: Path) -> tuple[set[str], int]:
    """The manifest's files (relative paths), each checked (present, the recorded size and sha256), and the format
    version."""
    path = root / "manifest.json"
    m = _read_json(path)
    if m.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format {m.get('format')!r} is not {BUNDLE_FORMAT!r}; not a retina bundle")
    version = m.get("version")
    if version not in KNOWN_VERSIONS:
        raise BundleError(f"{path}: bundle format version {version!r} is not one this retina reads "
                          f"({', '.join(map(str, KNOWN_VERSIONS))}); use the retina that exported it")  # fmt: skip
    files = m.get("files")
    if not isinstance(files, dict) or "bundle.json" not in files:
        raise BundleError(f"{path} lists no files (or not bundle.json); export the bundle again")
    missing, bad = [], []
    for rel, entry in sorted(files.items()):
        f = _safe_relpath(root, rel, path)
        if not f.is_file():
            missing.append(rel)
        elif f.stat().st_size != entry.get("bytes") or sha256_of(f) != entry.get("sha256"):
            bad.append(rel)
    if missing:
        folds = [r for r in missing if r.endswith(".safetensors")]
        what = f"fold model(s) {folds}" if folds else f"file(s) {missing}"
        raise BundleError(f"bundle {root}: {what} listed in manifest.json are missing"
                          + (f" (and {sorted(set(missing) - set(folds))})" if folds and len(folds) < len(missing)
                             else "") + "; no partial ensembles: copy the whole bundle")  # fmt: skip
    if bad:
        raise BundleError(f"bundle {root}: {bad} differ from manifest.json (sha256 or size); the bundle is damaged "
                          "or was changed, export or copy it again")  # fmt: skip
    extra = sorted(
        str(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    unlisted = [e for e in extra if e not in files]
    if unlisted:
        log.warning("bundle %s: %d file(s) not in manifest.json are ignored: %s", root, len(unlisted), unlisted[:5])
    return set(files), version


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _warn_versions(recorded: dict) -> None:
    here = library_versions()
    differ = {
        k: (v, here.get(k)) for k, v in recorded.items() if k in ("timm", "torch", "xgboost") and here.get(k) != v
    }
    for k, (then, now) in differ.items():
        log.warning("the bundle was exported with %s %s, this is %s: predictions may differ slightly", k, then, now)


# ------------------------------------------------------------------------------------------------ writing
@dataclass
class ExportConfig:
    runs: Path
    out: Path
    stack: Path | None = None  # default: RUNS/stack
    data: Path | None = None  # the training dataset (default: the backbones' data.dataset); only its manifest is read


def export_bundle(cfg: ExportConfig) -> Bundle:
    """Write the bundle of run ``cfg.runs`` to ``cfg.out`` (a new folder, written under a temporary name and renamed
    when complete) and return it opened (so every checksum has been read back)."""
    from retina_train.inference import BackboneRun, InferenceError, backbone_dirs
    from retina_train.settings import loader_config
    from retina_train.stack import StackError, load_meta_learner

    out = Path(cfg.out)
    if out.exists():
        raise BundleError(f"--out {out} exists; choose a new folder (a bundle is written whole, never into another)")
    require_out_folder(out, BundleError)
    stack_dir = Path(cfg.stack) if cfg.stack else Path(cfg.runs) / "stack"
    try:
        meta = load_meta_learner(stack_dir)
        dirs = backbone_dirs(Path(cfg.runs))
        runs = [BackboneRun.open(d, "cpu") for d in dirs]
    except (StackError, InferenceError) as exc:
        raise BundleError(f"{exc}; a bundle needs trained backbones and `retina-stack --runs {cfg.runs}`") from exc
    meta_doc = json.loads((stack_dir / "meta.json").read_text(encoding="utf-8"))
    names = [d.name for d in dirs]
    models = sorted({split_feature_name(c)[0] for c in meta.feature_columns})
    if models != names:
        raise BundleError(f"the meta-learner in {stack_dir} was trained on backbones {models}, {cfg.runs} holds "
                          f"{names}; rerun retina-stack on this run")  # fmt: skip
    data = Path(cfg.data) if cfg.data else Path(runs[0].cfg.data.dataset)
    try:
        ds = PackedDataset.open(data)
    except (RetinaError, OSError) as exc:
        raise BundleError(f"the training dataset {data} cannot be opened ({exc}); pass --data shards/NAME (only its "
                          "manifest.json is read: classes labelled, folds, pack options)") from exc  # fmt: skip
    for run in runs:
        missing = [str(m) for m in run.check_folds(ds.k)]
        if missing:
            raise BundleError(f"{missing} missing: {data} has {ds.k} folds and a bundle holds every fold model "
                              "(no partial ensembles); finish training those folds")  # fmt: skip

    tmp = tmp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        backbones = []
        for run in runs:
            folder = PurePosixPath("models") / run.name
            (tmp / folder).mkdir(parents=True)
            folds = []
            for w in run.weights:
                rel = folder / f"{w.parent.name}.safetensors"
                shutil.copyfile(w, tmp / rel)
                folds.append(str(rel))
            (tmp / folder / "config.json").write_text(json.dumps(to_dict(run.cfg), indent=1) + "\n", encoding="utf-8")
            model = run.load(run.weights[0])  # the weights fit the backbone, and its mean/std
            lcfg = loader_config(run.cfg, run.settings, model, folds=[0], mode="eval")
            preprocess = {"image_size": lcfg.image_size, "mean": list(lcfg.mean), "std": list(lcfg.std),
                          "local_contrast": lcfg.local_contrast, "eval_crop": lcfg.eval_crop,
                          "channels_last": bool(run.cfg.data.channels_last)}  # fmt: skip
            backbones.append({"name": run.name, "backbone": run.cfg.model.backbone, "folds": folds,
                              "config": str(folder / "config.json"), "preprocess": preprocess})  # fmt: skip
        (tmp / "meta").mkdir()
        meta_files = ["meta/meta.json", *(f"meta/{n}" for n in meta_doc["model_files"])]
        for rel in meta_files:
            shutil.copyfile(stack_dir / PurePosixPath(rel).name, tmp / rel)
        info = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "classes": list(CLASSES),
            "predicted_classes": list(meta.classes),
            "classes_present": list(ds.classes_present),
            "skipped_classes": meta_doc.get("skipped_classes", []),
            "backbones": backbones,
            "meta_files": meta_files,
            "training_data": {
                "name": Path(data).name,
                "preset": ds.manifest.get("preset"),
                "k": ds.k,
                "samples": ds.manifest["counts"]["accepted"],
                "pack": {
                    "resize": ds.manifest["options"].get("resize"),
                    "quality": ds.manifest["options"].get("quality", 95),
                },
            },  # fmt: skip
            "versions": library_versions(),
        }
        (tmp / "bundle.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        entries = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                entries[p.relative_to(tmp).as_posix()] = {"sha256": sha256_of(p), "bytes": p.stat().st_size}
        manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "files": entries}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.open(out)


def main(argv: list[str] | None = None) -> int:
    return console_main("retina-export", _run, argv)


def _run(argv: list[str] | None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="retina-export", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="the run folder (runs/EXP) with trained backbones")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to write, e.g. NAME.retina")
    p.add_argument("--stack", type=Path, default=None, help="the retina-stack output (default: RUNS/stack)")
    p.add_argument("--data", type=Path, default=None, help="the training dataset (default: the backbones' config); "
                   "only its manifest.json is read")  # fmt: skip
    args = p.parse_args(argv)
    setup_logging()
    bundle = export_bundle(ExportConfig(runs=args.runs, out=args.out, stack=args.stack, data=args.data))
    size = sum(e.stat().st_size for e in bundle.root.rglob("*") if e.is_file())
    folds = sum(len(b.weights) for b in bundle.backbones)
    print(json.dumps({"bundle": str(bundle.root), "backbones": [b.name for b in bundle.backbones], "fold_models": folds,
                      "classes": bundle.classes, "bytes": size}))  # fmt: skip
    return 0
