"""Publishing on the Hub, against a local server that speaks the Hub's HTTP API (`tests/hub_server.py`).

The real `huggingface_hub` client and transformers talk to it through `HF_ENDPOINT`: create repo, validate-yaml,
preupload, the ndjson commit, the LFS batch API with the upload to a separate storage origin, resolve, repo info.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from conftest import SHARED, requires_shared, tiny_vit_cascade
from hf_tinysaver import TinySaverForImageClassification
from hf_tinysaver.hub.push import HubPushError, push_cascade
from hub_server import DEFAULT_TOKEN
from tiny_models import timm_classifier, tiny_vit, tiny_vit_processor

REPO_ID = "tester/tiny-cascade"
CALIBRATION = {
    "objective": "max-drop",
    "max_drop": 0.5,
    "threshold": 0.6,
    "exit_rate": 0.55,
    "accuracy": 0.62,
    "base_accuracy": 0.625,
    "saver_accuracy": 0.58,
    "relative_macs": 0.52,
    "n": 64,
    "dataset": "uoft-cs/cifar10",
    "split": "test[:50%]",
    "plot": "tradeoff.png",
}


def make_cascade(threshold: float = 0.6, **config_kwargs) -> TinySaverForImageClassification:
    return tiny_vit_cascade(threshold, calibration=dict(CALIBRATION, threshold=threshold), **config_kwargs)


def write_plot(path: Path) -> Path:
    Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)).save(path)
    return path


def local_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


@pytest.fixture(scope="module")
def pushed(fake_hub, hub_env, tmp_path_factory):
    """A tiny cascade saved with its plot and pushed once to REPO_ID."""
    folder = tmp_path_factory.mktemp("cascade")
    cascade = make_cascade()
    cascade.save_pretrained(folder)
    write_plot(folder / "tradeoff.png")
    commit = push_cascade(folder, REPO_ID, commit_message="First upload")
    return {"folder": folder, "cascade": cascade, "commit": commit}


def test_push_uploads_model_processor_code_card_and_plot_in_one_commit(fake_hub, pushed):
    folder, commit = pushed["folder"], pushed["commit"]
    history = fake_hub.commits(REPO_ID)
    assert [c.title for c in history] == ["First upload", "initial commit"] and history[0].oid == commit.oid

    expected = local_files(folder)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_tinysaver.py"} <= set(expected)
    assert set(history[0].files) == set(expected) | {"README.md", ".gitattributes"}
    for name, content in expected.items():
        assert fake_hub.file_bytes(REPO_ID, name) == content, name

    # The weights and the plot travel through the LFS batch API to the storage, never inline in the commit.
    operations = dict((path, key) for key, path in history[0].operations)
    assert operations["model.safetensors"] == "lfsFile" and operations["tradeoff.png"] == "lfsFile"
    assert operations["config.json"] == "file" and operations["README.md"] == "file"
    weights_sha256 = hashlib.sha256(expected["model.safetensors"]).hexdigest()
    assert weights_sha256 in fake_hub.lfs_uploads
    assert history[0].files["model.safetensors"].lfs_sha256 == weights_sha256
    calls = [(r.server, r.method, r.path.split("?")[0]) for r in fake_hub.requests]
    assert ("storage", "PUT", f"/upload/{weights_sha256}") in calls
    assert calls.index(("hub", "POST", "/api/validate-yaml")) < calls.index(
        ("hub", "POST", f"/api/models/{REPO_ID}/commit/main")
    )

    card = fake_hub.file_bytes(REPO_ID, "README.md").decode()
    assert "![Accuracy versus relative MACs of the cascade as the threshold varies](tradeoff.png)" in card
    assert f'pipeline("image-classification", model="{REPO_ID}", trust_remote_code=True)' in card
    info = HfApi().model_info(REPO_ID)
    assert info.sha == commit.oid and info.library_name == "transformers"
    assert info.pipeline_tag == "image-classification" and "tinysaver" in info.tags
    assert info.card_data["datasets"] == ["uoft-cs/cifar10"]


def test_load_by_repo_id_from_empty_cache_then_offline(fake_hub, hub_env, pushed, images):
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert not list(cache.glob("models--tester--tiny-cascade*")), "the cache must start empty"
    model = AutoModelForImageClassification.from_pretrained(REPO_ID, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(REPO_ID, trust_remote_code=True)
    assert list(cache.glob("models--tester--tiny-cascade/snapshots/*/model.safetensors"))
    local_processor = pushed["cascade"].get_image_processor()
    assert (processor.preprocessing, processor.base_preprocessing) == (
        local_processor.preprocessing,
        local_processor.base_preprocessing,
    )

    cascade = pushed["cascade"]
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        expected, actual = cascade(**inputs), model(**inputs)
    assert torch.equal(actual.logits, expected.logits) and torch.equal(actual.exited, expected.exited)

    requests_before = len(fake_hub.requests)
    hub_env.set_offline(True)
    try:
        offline = AutoModelForImageClassification.from_pretrained(REPO_ID, trust_remote_code=True)
        classifier = pipeline("image-classification", model=REPO_ID, trust_remote_code=True)
        predictions = classifier(images[0], top_k=2)
    finally:
        hub_env.set_offline(False)
    assert len(fake_hub.requests) == requests_before, "offline loading must not contact the Hub"
    with torch.no_grad():
        assert torch.equal(offline(**inputs).logits, expected.logits)
    assert [p["label"] for p in predictions] == [
        cascade.config.id2label[int(i)] for i in expected.logits[0].softmax(-1).topk(2).indices
    ]


def test_pipeline_by_repo_id(hub_env, pushed, images):
    classifier = pipeline("image-classification", model=REPO_ID, trust_remote_code=True)
    predictions = classifier(images[:3], top_k=1)
    cascade = pushed["cascade"]
    inputs = cascade.get_image_processor()(images=images[:3], return_tensors="pt")
    with torch.no_grad():
        expected = cascade(**inputs).logits.argmax(-1)
    assert [p[0]["label"] for p in predictions] == [cascade.config.id2label[int(i)] for i in expected]


FRESH_PROCESS_SCRIPT = """
import re
import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

repo_id, images_path = sys.argv[1:3]
model = AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True)
images = [Image.fromarray(array.numpy()) for array in torch.load(images_path)]
with torch.no_grad():
    outputs = model(**processor(images=images, return_tensors="pt"))
predictions = pipeline("image-classification", model=repo_id, trust_remote_code=True)(images[0], top_k=3)
# The model card's usage snippets must run exactly as written.
card = open(hf_hub_download(repo_id, "README.md"), encoding="utf-8").read()
snippets = re.findall(r"```python\\n(.*?)```", card, flags=re.S)
for snippet in snippets:
    exec(compile(snippet, "README.md", "exec"), {"__name__": "__snippet__"})
result = {"logits": outputs.logits, "exited": outputs.exited, "module": type(model).__module__,
          "predictions": predictions, "snippets": len(snippets)}
"""


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_fresh_process_without_hf_tinysaver_loads_by_repo_id_then_offline(
    fake_hub, pushed, images, tmp_path, run_without_hf_tinysaver
):
    arrays = torch.stack([torch.from_numpy(np.array(image.resize((40, 40)))) for image in images[:4]])
    torch.save(arrays, tmp_path / "images.pt")

    def run(**env: str) -> dict:
        return run_without_hf_tinysaver(FRESH_PROCESS_SCRIPT, REPO_ID, tmp_path / "images.pt", cwd=tmp_path, env=env)

    online = run(HF_ENDPOINT=fake_hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
    requests_before = len(fake_hub.requests)
    offline = run(HF_ENDPOINT=_closed_port_url())
    assert len(fake_hub.requests) == requests_before

    assert offline["module"] == online["module"]
    assert online["snippets"] == 2
    cascade = pushed["cascade"]
    inputs = cascade.get_image_processor()(images=[Image.fromarray(a.numpy()) for a in arrays], return_tensors="pt")
    with torch.no_grad():
        expected = cascade(**inputs)
    for result in (online, offline):
        assert torch.equal(result["logits"], expected.logits) and torch.equal(result["exited"], expected.exited)
    assert offline["predictions"] == online["predictions"]


def test_second_push_makes_a_new_commit_and_keeps_everything(fake_hub, hub_env, tmp_path):
    repo_id = "tester/cascade-updates"
    first, second = tmp_path / "first", tmp_path / "second"
    cascade = make_cascade(threshold=0.6)
    cascade.save_pretrained(first)
    write_plot(first / "tradeoff.png")
    first_commit = push_cascade(first, repo_id)
    uploads_before = list(fake_hub.lfs_uploads)

    cascade.config.threshold = 0.8
    cascade.config.calibration = dict(CALIBRATION, threshold=0.8)
    cascade.save_pretrained(second)
    second_commit = push_cascade(second, repo_id, plot=write_plot(tmp_path / "tradeoff.png"))

    history = fake_hub.commits(repo_id)
    assert [c.oid for c in history[:2]] == [second_commit.oid, first_commit.oid]
    assert history[0].parent == first_commit.oid
    assert set(history[0].files) == set(history[1].files), "nothing may be lost"
    assert fake_hub.file_bytes(repo_id, "model.safetensors") == (first / "model.safetensors").read_bytes()
    # Unchanged weights and plot are neither uploaded nor committed again.
    assert fake_hub.lfs_uploads == uploads_before
    assert {path for _, path in history[0].operations} == {"config.json", "README.md"}

    assert json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())["threshold"] == 0.8
    old = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=first_commit.oid)).read_text())
    assert old["threshold"] == 0.6
    assert (
        "| Threshold (exit when confidence > threshold) | 0.8 |" in fake_hub.file_bytes(repo_id, "README.md").decode()
    )


def test_push_to_hub_method_on_the_model(fake_hub, hub_env):
    cascade = make_cascade()
    with pytest.warns(UserWarning, match="names the plot 'tradeoff.png'"):
        commit = cascade.push_to_hub("tester/from-method", commit_message="Upload from the model")
    files = set(fake_hub.commits("tester/from-method")[0].files)
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert fake_hub.commits("tester/from-method")[0].oid == commit.oid


def test_card_lists_hub_sub_models_and_the_stricter_license(fake_hub, hub_env, tmp_path):
    api = HfApi()
    for repo_id, model, license_id in (
        ("tester/tiny-saver", timm_classifier("test_efficientnet"), "mit"),
        ("tester/tiny-base", tiny_vit(32), "apache-2.0"),
    ):
        folder = tmp_path / repo_id.split("/")[1]
        model.save_pretrained(folder)
        if repo_id.endswith("base"):
            tiny_vit_processor(32).save_pretrained(folder)
        (folder / "README.md").write_text(f"---\nlicense: {license_id}\n---\n# {repo_id}\n")
        api.create_repo(repo_id)
        api.upload_folder(folder_path=folder, repo_id=repo_id)
    cascade = TinySaverForImageClassification.from_saver_and_base("tester/tiny-saver", "tester/tiny-base")
    push_cascade(cascade, "tester/hub-parts")
    card = fake_hub.file_bytes("tester/hub-parts", "README.md").decode()
    assert "\nlicense: apache-2.0\n" in card
    assert "\nbase_model:\n- tester/tiny-saver\n- tester/tiny-base\n" in card
    assert "[tester/tiny-base](https://huggingface.co/tester/tiny-base)" in card


def test_missing_token_is_a_clear_error(fake_hub, hub_env, pushed, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    requests_before = len(fake_hub.requests)
    with pytest.raises(HubPushError, match=r"hf auth login.*--token.*HF_TOKEN"):
        push_cascade(pushed["folder"], REPO_ID)
    assert len(fake_hub.requests) == requests_before


def test_refused_upload_is_a_clear_error(fake_hub, hub_env, pushed):
    head = fake_hub.commits(REPO_ID)[0].oid
    fake_hub.refuse_uploads = True
    try:
        with pytest.raises(HubPushError, match=r"403.*token lacks write access to that repo") as error:
            push_cascade(pushed["folder"], REPO_ID)
    finally:
        fake_hub.refuse_uploads = False
    assert REPO_ID in str(error.value)
    assert fake_hub.commits(REPO_ID)[0].oid == head


def test_foreign_namespace_and_invalid_token_are_clear_errors(fake_hub, hub_env, pushed):
    with pytest.raises(HubPushError, match="lacks write access"):
        push_cascade(pushed["folder"], "someone-else/cascade")
    with pytest.raises(HubPushError, match=r"rejected the token.*hf auth login"):
        push_cascade(pushed["folder"], REPO_ID, token="hf_not_a_valid_token")


def run_cli(argv: list[str]) -> int:
    from hf_tinysaver.commands import main

    return main(argv)


def test_cli_push_and_card_only(fake_hub, hub_env, pushed, capsys, monkeypatch, tmp_path):
    folder = str(pushed["folder"])
    assert run_cli(["push", "tester/cli-cascade", folder, "--private", "--commit-message", "Upload from the CLI"]) == 0
    history = fake_hub.commits("tester/cli-cascade")
    assert history[0].title == "Upload from the CLI" and fake_hub.repo("tester/cli-cascade").private
    assert capsys.readouterr().out.strip() == history[0].oid.join(
        [f"{fake_hub.endpoint}/tester/cli-cascade/commit/", ""]
    )

    # An edited calibration record: only the card it renders is uploaded, not the edited config.json.
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    config = json.loads((edited / "config.json").read_text())
    config["calibration"]["accuracy"] = 0.6
    (edited / "config.json").write_text(json.dumps(config))
    assert run_cli(["push", "tester/cli-cascade", str(edited), "--card-only"]) == 0
    latest = fake_hub.commits("tester/cli-cascade")[0]
    assert latest.title == "Update model card" and [path for _, path in latest.operations] == ["README.md"]
    assert "| Accuracy of the cascade | 60.00 % |" in fake_hub.file_bytes("tester/cli-cascade", "README.md").decode()

    monkeypatch.delenv("HF_TOKEN")
    assert run_cli(["push", "tester/cli-cascade", folder]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error.startswith("tinysaver: error: ") and "hf auth login" in error


def test_fake_hub_rejects_inline_binaries_and_unknown_lfs_objects(fake_hub, hub_env):
    import base64

    import httpx2

    api = HfApi()
    api.create_repo("tester/raw")
    headers = {"Authorization": f"Bearer {DEFAULT_TOKEN}", "Content-Type": "application/x-ndjson"}
    header = {"key": "header", "value": {"summary": "raw"}}
    inline = {
        "key": "file",
        "value": {"path": "w.safetensors", "encoding": "base64", "content": base64.b64encode(b"\0weights").decode()},
    }
    missing = {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 8}}
    url = f"{fake_hub.endpoint}/api/models/tester/raw/commit/main"
    for operation, status, message in ((inline, 400, "upload it with Git LFS"), (missing, 422, "was not uploaded")):
        body = "\n".join(json.dumps(line) for line in (header, operation))
        response = httpx2.post(url, content=body.encode(), headers=headers)
        assert response.status_code == status and message in response.json()["error"], response.text
    assert [c.title for c in fake_hub.commits("tester/raw")] == ["initial commit"]


def test_create_pr_commits_to_a_pull_request_ref_and_leaves_main(fake_hub, hub_env, pushed):
    head = fake_hub.commits(REPO_ID)[0].oid
    edited = make_cascade(threshold=0.7)
    commit = push_cascade(edited, REPO_ID, create_pr=True, plot=pushed["folder"] / "tradeoff.png")
    assert commit.pr_url == f"{fake_hub.endpoint}/{REPO_ID}/discussions/1"
    assert fake_hub.commits(REPO_ID)[0].oid == head
    assert fake_hub.commits(REPO_ID, revision="refs/pr/1")[0].parent == head
    config = json.loads(Path(hf_hub_download(REPO_ID, "config.json", revision="refs/pr/1")).read_text())
    assert config["threshold"] == 0.7


def test_push_finds_the_plot_in_the_folder_when_the_record_names_none(fake_hub, hub_env, tmp_path):
    """Cascades saved now keep no plot path in their calibration record: the folder's tradeoff.png is the plot."""
    calibration = {key: value for key, value in CALIBRATION.items() if key != "plot"}
    cascade = tiny_vit_cascade(0.6, calibration=dict(calibration, threshold=0.6))
    cascade.save_pretrained(tmp_path / "cascade")
    write_plot(tmp_path / "cascade" / "tradeoff.png")
    assert "plot" not in json.loads((tmp_path / "cascade" / "config.json").read_text())["calibration"]
    push_cascade(tmp_path / "cascade", "tester/plot-from-folder")
    assert "tradeoff.png" in fake_hub.commits("tester/plot-from-folder")[0].files
    card = fake_hub.file_bytes("tester/plot-from-folder", "README.md").decode()
    assert "![Accuracy versus relative MACs of the cascade as the threshold varies](tradeoff.png)" in card


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_card_shows_the_held_out_evaluation_licenses_and_names_local_data_honestly(fake_hub, hub_env, tmp_path):
    """calibrate -> evaluate --save-to-folder -> push: the card read back from the Hub holds the held-out figures."""
    out = tmp_path / "cascade"
    cache = ["--cache-dir", str(tmp_path / "cache"), "--assets", str(SHARED), "--no-progress"]
    pair = ["--saver", "cifar10-resnet20", "--base", "cifar10-resnet56", "--dataset", "cifar10"]
    calibrate = ["calibrate", *pair, "--split", "test[:300]", "--objective", "max-drop", "--max-drop", "1"]
    assert run_cli([*calibrate, "--out", str(out), *cache]) == 0
    evaluate = ["evaluate", "--model", str(out), "--dataset", "cifar10", "--split", "test[300:500]"]
    assert run_cli([*evaluate, "--save-to-folder", *cache]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["n"] == 200 and evaluation["provenance"]["hardware"]

    assert run_cli(["push", "tester/held-out", str(out)]) == 0
    card = ModelCard.load("tester/held-out")
    by_name = {result.metric_name: result for result in card.data.eval_results}
    held_out = by_name["Accuracy of the cascade (held-out)"]
    assert held_out.metric_value == evaluation["accuracy"] and held_out.dataset_split == "test[300:500]"
    assert by_name["Accuracy of the base model alone (held-out)"].metric_value == evaluation["base_accuracy"]
    drop = by_name["Accuracy drop vs. the base model (points)"]
    assert drop.metric_value == pytest.approx(evaluation["accuracy_drop_points"])
    assert by_name["Exit rate (images answered by the saver)"].metric_value == evaluation["exit_rate"]
    assert by_name["Relative MACs (cascade / base model)"].metric_value == evaluation["relative_macs"]
    throughput = by_name["Images per second of the cascade"]
    assert throughput.metric_args == {"hardware": evaluation["provenance"]["hardware"]}
    # Only held-out figures: the in-sample calibration accuracy is not in the model-index once there is an evaluation.
    assert not any("in-sample" in name for name in by_name)
    assert f"| Accuracy of the cascade | {100 * evaluation['accuracy']:.2f} % |" in card.text
    assert f"on {evaluation['provenance']['hardware']}" in card.text

    # The zoo's CIFAR-10 is a local JPEG copy: named as such, never as the Hub dataset `cifar10`.
    assert card.data.datasets is None and "datasets" not in card.data.to_dict()
    assert held_out.dataset_type == "cifar10-jpeg" and "a local copy of CIFAR-10" in card.text
    # The sub-models' license, the notice it requires and their source.
    assert card.data.license == "bsd-2-clause"
    assert "## Licenses and Notices" in card.text and "Copyright (c) 2018, Yerlan Idelbayev" in card.text
    assert "https://github.com/akamaster/pytorch_resnet_cifar10" in card.text
    assert "## Limitations" in card.text and "only the 10 classes" in card.text
    assert len(card.data.tags) == len(set(card.data.tags)) and "tinysaver" in card.data.tags

    # Extra tags that repeat the default ones are listed once.
    push_cascade(out, "tester/held-out", card_only=True, tags=["tinysaver", "early-exit", "cifar10", "cifar10"])
    tags = ModelCard.load("tester/held-out").data.tags
    assert len(tags) == len(set(tags)) and "cifar10" in tags


def test_unreachable_hub_is_one_clear_line(tmp_path):
    """A push to an endpoint nothing listens on ends with one `tinysaver: error:` line, not an httpx traceback."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    folder = tmp_path / "cascade"
    make_cascade().save_pretrained(folder)
    with socket.socket() as probe:  # a free port, closed again: connections to it are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if key != "TINYSAVER_DEBUG"}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HUB_OFFLINE="0",
        HF_TOKEN="hf_some_token",
        HF_HOME=str(tmp_path / "hf_home"),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")]),
    )
    process = subprocess.run(
        [sys.executable, "-m", "hf_tinysaver.commands", "push", "tester/unreachable", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr, process.stderr
    (error,) = [line for line in process.stderr.splitlines() if "error:" in line]
    assert error.startswith("tinysaver: error: Cannot reach the Hub at http://127.0.0.1:"), error
    assert "tester/unreachable" in error and "HF_ENDPOINT" in error and "nothing was uploaded" in error
