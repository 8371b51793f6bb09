"""The fine-tuned model as an MLflow transformers model with the chat task (`llm/v1/chat`): what is logged, with
which requirements, registered as a new version with its lineage, how a logged model becomes an sftops model
folder again, and answers from it.

Two shapes (see README, Serving):
- a LoRA/DoRA adapter on a hub base (`org/name`) whose tokenizer sftops did not change: the adapter alone, on the
  base named with its resolved commit (MLflow's PEFT layout; the serving machine fetches the base at that commit);
- anything else (a GGUF or `pkg:` base, a local folder, full fine-tuning, a tokenizer given a chat template here):
  self-contained full weights in safetensors, the adapter merged in, so serving needs neither gguf nor the package
  that held the base.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from packaging.version import Version

from sftops.chat import stop_token_ids
from sftops.config import ModelConfig
from sftops.errors import ConfigError
from sftops.modeling import MANIFEST, is_adapter, load_finetuned, read_manifest, resolve_base
from sftops.provenance.manifest import model_section
from sftops.redact import redact
from sftops.tracking.runs import MANIFEST_ARTIFACT
from sftops.tracking.store import tracking_uri
from sftops.tracking.tags import LINEAGE_TAGS, REVISION_TAG, UNRECORDED, VERSIONED, VERSIONED_REASON

CHAT_TASK = "llm/v1/chat"
GUARD = Path(__file__).with_name("served_chat.py")  # the pyfunc entry point, shipped in the model's code/ folder
DEFAULT_MAX_NEW_TOKENS = 64  # sftops generate's default: the endpoint answers alike when max_tokens is not given
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8}


def pinned(package: str) -> str:
    """package==version without a local label (torch 2.13.0+cpu -> torch==2.13.0): the same release installs on a
    CUDA machine from the index it uses there."""
    return f"{package}=={Version(version(package)).public}"


def served_requirements(adapter: bool) -> list[str]:
    """What the served model imports: no sftops, no gguf, no package that held the base."""
    packages = ["torch", "transformers", "tokenizers", "safetensors", "mlflow", *(["peft"] if adapter else [])]
    return [pinned(p) for p in packages]


def hub_snapshot(base: dict[str, Any]) -> Path | None:
    """The local snapshot of the hub base the adapter was trained on (its folder name is the commit): at the
    manifest's revision, else at the commit the cache's main pointed to when training loaded it."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(base["base"], "config.json", revision=base.get("revision"))
    return Path(cached).parent if isinstance(cached, str) else None


def logs_adapter(info: dict[str, Any], tokenizer: Any) -> bool:
    """Whether the adapter can be logged alone, on its base named by hub id: the base loads with transformers
    from the hub (not GGUF, not a package or local folder) and the tokenizer is the base's own (MLflow's PEFT
    layout takes the tokenizer from the hub too)."""
    base = info["base"]
    local = base.get("gguf_file") or Path(resolve_base(base["base"])).is_dir()
    if local or not is_adapter(info) or info["method"] == "qlora":
        return False
    from transformers import AutoTokenizer

    hub_tokenizer = AutoTokenizer.from_pretrained(base["base"], revision=base.get("revision"))
    return hub_tokenizer.chat_template == tokenizer.chat_template


def decoding(tokenizer: Any) -> dict[str, Any]:
    """Greedy, stopping where sftops generate stops (EOS or end of turn), as many new tokens by default."""
    return {
        "do_sample": False,
        "eos_token_id": stop_token_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
    }


def served_config(tokenizer: Any) -> dict[str, Any]:
    """The pyfunc's model_config: the decoding, and the rendered prompt encoded as evaluate and training encode it,
    without the tokenizer's special tokens. The chat template writes BOS itself (the fallback template does, as
    Llama's templates do); MLflow's text-generation pipeline would add it a second time with a tokenizer that adds
    BOS (stories260K's), which changed greedy answers and MLflow's token count, so where answers stop."""
    return {**decoding(tokenizer), "add_special_tokens": False}


def set_decoding(model: Any, tokenizer: Any) -> None:
    """Into the saved generation config (what mlflow.transformers.load_model's pipeline uses) as well as the
    pyfunc's model_config: an adapter's base comes from the hub with the hub's generation config."""
    config = model.generation_config
    config.temperature, config.top_p, config.top_k = None, None, None
    for key, value in decoding(tokenizer).items():
        setattr(config, key, value)


def model_card(info: dict[str, Any], shape: str) -> Any:
    from huggingface_hub import ModelCard

    base = info["base"]
    at = f" at {base['revision']}" if base.get("revision") else ""
    named = shown_base(base["base"])
    return ModelCard(
        f"---\nlibrary_name: transformers\n---\nsftops {info['method']} fine-tune of {named}{at}: "
        f"{shape}. Served with the MLflow transformers flavor, task {CHAT_TASK}.\n"
    )


class _ChatFlavor:
    """Model.log's flavor: MLflow's transformers flavor, whose python_function entry point is served_chat (the
    transformers pyfunc behind a request check); for an adapter, the base named by hub id at its commit."""

    __name__ = "transformers"

    @staticmethod
    def save_model(path: str, mlflow_model: Any, hub_base: tuple[str, str] | None = None, **kwargs: Any) -> None:
        mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model, code_paths=[str(GUARD)], **kwargs)
        mlflow_model.signature = served_signature(mlflow_model.signature)
        flavors = mlflow_model.flavors
        flavors["python_function"]["loader_module"] = GUARD.stem
        if hub_base:
            _name_hub_base(Path(path), flavors["transformers"], *hub_base)
        mlflow_model.save(str(Path(path) / "MLmodel"))


def served_signature(chat: Any) -> Any:
    """What served_chat honours, and only that: messages, max_tokens, stop (MLflow's chat signature also offers
    n, stream, temperature, tools ..., which this greedy one-completion model would ignore). Typed `any`: served_chat
    checks the types and refuses with its reason alone, where MLflow's schema enforcement would quote the whole
    request back. Fields outside it are dropped by MLflow before the model sees them (a warning in the server's
    log)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    fields = [
        ColSpec(AnyType(), "messages", required=False),  # its absence is served_chat's refusal too
        ColSpec(AnyType(), "max_tokens", required=False),
        # a list: a column of Array type makes MLflow read the request as one row (its messages one value)
        ColSpec(Array(DataType.string), "stop", required=False),
    ]
    return ModelSignature(inputs=Schema(fields), outputs=chat.outputs if chat else None)


def _name_hub_base(path: Path, flavor: dict[str, Any], repo: str, revision: str) -> None:
    """Saved against the base's local snapshot (MLflow would otherwise ask the hub for its newest commit, which
    is not the one trained on, and fails offline), then recorded as MLflow records a hub base: name and commit,
    tokenizer from the same commit."""
    from mlflow.transformers.flavor_config import FlavorKey

    flavor.pop(FlavorKey.MODEL_LOCAL_BASE)
    flavor.update(
        {
            FlavorKey.MODEL_NAME: repo,
            FlavorKey.MODEL_REVISION: revision,
            FlavorKey.COMPONENT_NAME.format("tokenizer"): repo,
            FlavorKey.COMPONENT_REVISION.format("tokenizer"): revision,
        }
    )
    shutil.rmtree(path / "components" / "tokenizer")


def shown_base(base: str) -> str:
    """The base as the logged model names it: a local folder by its folder's name (its path is the training
    machine's, and means nothing where the model is served); a hub id or pkg:<package> as given."""
    return f"local folder {Path(base).name}" if Path(base).is_absolute() or Path(base).is_dir() else redact(base)


def _metadata(info: dict[str, Any]) -> dict[str, Any]:
    """The MLmodel file's metadata: the sftops manifest (local_model_dir rebuilds the folder from it), and the base
    the model was trained from with the commit (pkg: version) it was at, for a reader of the MLmodel file. Full
    weights never load their base again, so a local base is named, not located."""
    base = info["base"]
    if info.get("weights") == "full":
        info = {**info, "base": {**base, "base": shown_base(base["base"])}}
    return {"sftops": info, "base_model": shown_base(base["base"]), "base_model_revision": base.get("revision")}


# The step the logged model is attached to its run at. MLflow links every metric the run holds at that step to the
# model when it is logged (the default, step 0, gave the model the validation NLL before training, the system
# metrics' first sample and the run's constants); no metric is ever logged at -1, so the model's metrics are only
# those register_model links on purpose.
MODEL_STEP = -1


def logged_model_name(registered_model_name: str, run_id: str) -> str:
    """The logged model's name as the UI lists it: the registered model's name and the run's first 8 hex digits
    (`smollm2-chatterbot-411a504b`), in the characters MLflow allows in a logged model's name."""
    return re.sub(r"[/:.%\"']", "-", f"{registered_model_name}-{run_id[:8]}")


def log_chat_model(model_dir: Path, registered_model_name: str) -> Any:
    """Log the saved sftops model as an MLflow transformers chat model and register it; its sftops manifest
    goes into the MLmodel metadata (`sftops`), so local_model_dir can rebuild the folder. MLflow gives the logged
    model the run's params (its size and the examples it was trained on among them)."""
    info = read_manifest(model_dir)
    model, tokenizer = load_finetuned(model_dir)
    adapter = logs_adapter(info, tokenizer) and (snapshot := hub_snapshot(info["base"])) is not None
    extra: dict[str, Any] = {}
    if adapter:
        revision = snapshot.name
        if "revision" in ModelConfig.model_fields:  # model.revision pins the base (the manifest then has it too)
            info = {**info, "base": {**info["base"], "revision": revision}}
        extra = {"hub_base": (info["base"]["base"], revision), "base_model_path": str(snapshot)}
        shape = f"LoRA adapter on {info['base']['base']} at {revision}"
    else:
        shape = "full weights in safetensors" + (" (adapter merged in)" if is_adapter(info) else "")
        if is_adapter(info):
            model = model.merge_and_unload()
        # what MLflow records as the model's source and a response names as `model`: the registry's name, not a
        # path on this machine (the base's folder, or the package that held a pkg: base); in its models:/ form,
        # which is no hub id, so MLflow does not ask the hub for a licence of a repository by that name
        model.config._name_or_path = model.name_or_path = f"models:/{registered_model_name}"
        info = {**info, "weights": "full"}
    set_decoding(model, tokenizer)
    return mlflow.models.Model.log(
        artifact_path=None,
        name=logged_model_name(registered_model_name, mlflow.active_run().info.run_id),
        step=MODEL_STEP,
        flavor=_ChatFlavor,
        registered_model_name=registered_model_name,
        transformers_model={"model": model, "tokenizer": tokenizer},
        task=CHAT_TASK,
        input_example=INPUT_EXAMPLE,
        model_config=served_config(tokenizer),
        pip_requirements=served_requirements(adapter),
        metadata=_metadata(info),
        model_card=model_card(info, shape),
        **extra,
    )


def register_model(model_dir: Path, name: str, measured: dict[str, float], step: int) -> dict[str, Any]:
    """Log the saved model in the open run as an MLflow transformers chat model (tracking.models), register it as
    a new version tagged with its lineage, and complete the run's reproducibility manifest with the model's
    hashes. `measured`: what was measured on the saved weights (the validation NLL after training), logged in the
    run at `step` and linked to the logged model, its only training-run metrics (no system metric, no constant)."""
    info = log_chat_model(model_dir, name)
    run = mlflow.active_run()
    client = MlflowClient()
    if measured:
        mlflow.log_metrics(measured, step=step, model_id=info.model_id)
    version = str(info.registered_model_version)
    run_tags = client.get_run(run.info.run_id).data.tags
    for key in run_tags:
        if key in LINEAGE_TAGS or REVISION_TAG.match(key):
            client.set_model_version_tag(name, version, key, run_tags[key])
    client.set_model_version_tag(name, version, VERSIONED, "false")  # until the flow has recorded it
    client.set_model_version_tag(name, version, VERSIONED_REASON, UNRECORDED)
    manifest = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{MANIFEST_ARTIFACT}")
    manifest["model"] = {**model_section(model_dir), "registered_model": name, "version": version}
    mlflow.log_dict(manifest, MANIFEST_ARTIFACT)
    client.set_model_version_tag(name, version, "manifest", f"runs:/{run.info.run_id}/{MANIFEST_ARTIFACT}")
    return {"model_uri": info.model_uri, "registered_model": name, "version": version}


def local_model_dir(uri: str, tracking: str | None = None) -> Path:
    """A local folder that modeling.load_finetuned loads, for a logged or registered model: the weights (or
    adapter) MLflow stored, its tokenizer, and the sftops manifest from the MLmodel metadata. Models logged by
    older sftops (a pyfunc holding an sftops folder) are found by their manifest file."""
    mlflow.set_tracking_uri(tracking or tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="sftops-")))
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(
            f"cannot load {uri} from {redact(mlflow.get_tracking_uri())}: {redact(exc.message.splitlines()[0][:300])}"
        ) from None
    mlmodel = yaml.safe_load((local / "MLmodel").read_text()) if (local / "MLmodel").exists() else {}
    info = (mlmodel.get("metadata") or {}).get("sftops")
    if info is None:
        found = sorted(local.rglob(MANIFEST))
        if not found:
            raise ConfigError(f"{uri} is not an sftops model (no sftops metadata in its MLmodel, no {MANIFEST})")
        return found[0].parent
    flavor = mlmodel["flavors"]["transformers"]
    folder = local / (flavor["peft_adaptor"] if "peft_adaptor" in flavor else flavor["model_binary"])
    tokenizer_dir = local / "components" / "tokenizer"
    if tokenizer_dir.is_dir():
        for file in tokenizer_dir.iterdir():
            shutil.copy(file, folder / file.name)
    else:  # the adapter's tokenizer is its hub base's, at the recorded commit
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(flavor["tokenizer_name"], revision=flavor["tokenizer_revision"])
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as modeling.load_tokenizer sets it
        tokenizer.save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def predict(
    uri: str, prompts: list[str], max_new_tokens: int, tracking: str | None = None, base: bool = False
) -> list[str]:
    """Answers from a logged or registered model (with `base`: from the base it was fine-tuned from), generated
    as from a local model folder (sftops generate)."""
    from sftops.evaluate.sides import answer_with

    return answer_with(local_model_dir(uri, tracking), prompts, max_new_tokens, base)
