"""Per-node data: ``fedlorm partition`` writes the simulator's exact client shares, the loader reads
them back (or refuses a bad folder in one line), and a run or a Flower node fed from the folders gives
the same numbers as one fed from the dataset."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_config
from reference_runs import assert_equals_reference
from safetensors.torch import save_file

from fedlorm.cli import main
from fedlorm.config import apply_overrides
from fedlorm.data import partition_store
from fedlorm.data.partition_store import MANIFEST, SERVER, make_manifest, read_partition, write_partitions
from fedlorm.methods import ClientData
from fedlorm.runtime import experiment as experiment_module
from fedlorm.runtime.experiment import build_data, build_experiment, effective_config
from fedlorm.runtime.partitions import data_config, folder_source, load_partition, node_experiment
from fedlorm.runtime.partitions import write_partitions as write_run_partitions
from fedlorm.runtime.simulator import run_simulation
from fedlorm.seeding import torch_generator


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """``fedlorm partition`` of the tiny config (the default preset changes no data field)."""
    out = tmp_path_factory.mktemp("partitions") / "parts"
    assert main(["partition", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def data():
    return build_data(effective_config(tiny_config()))


def _broken_copy(written: Path, tmp_path: Path, client: int = 0) -> Path:
    folder = tmp_path / f"client-{client}"
    shutil.copytree(written / f"client-{client}", folder)
    return folder


# -- writing and reading back ----------------------------------------------------------------------
def test_the_folders_hold_exactly_the_simulators_shares_and_evaluation_set(written, data):
    cfg = tiny_config()
    assert sorted(p.name for p in written.iterdir()) == ["client-0", "client-1", "client-2", "server"]
    for k in range(3):
        shares = load_partition(written / f"client-{k}", cfg, k)
        assert len(shares) == 2
        for task, share in enumerate(shares):
            idx = data.partitions[task][k]
            assert share.images.dtype == torch.uint8 and share.labels.dtype == torch.int64
            assert torch.equal(share.images, data.train.images[idx])
            assert torch.equal(share.labels, data.train.labels[idx])
    server = load_partition(written / SERVER, cfg, SERVER)
    assert sum(len(s) for s in server) == len(data.test)
    for task, share in enumerate(server):
        keep = torch.isin(data.test.labels, torch.arange(task * 5, task * 5 + 5))
        assert torch.equal(share.images, data.test.images[keep])
        assert torch.equal(share.labels, data.test.labels[keep])
    manifest = json.loads((written / "client-1" / MANIFEST).read_text())
    assert manifest["client"] == 1 and manifest["num_clients"] == 3 and manifest["num_tasks"] == 2
    assert manifest["task_classes"] == [[0, 5], [5, 10]] and manifest["class_names"] == data.class_names
    assert manifest["config"] == data_config(cfg, 1) and manifest["split"] == "train"
    assert json.loads((written / SERVER / MANIFEST).read_text())["split"] == "test"


def test_a_run_fed_from_the_folders_equals_the_normal_run(written, reference_run):
    cfg = tiny_config()
    exp = build_experiment(cfg)
    exp.client_source = folder_source(written, cfg)
    exp.train = ClientData(exp.train.images[:0], exp.train.labels[:0])  # nothing left to fall back on
    exp.partitions = []
    from_folders = run_simulation(cfg, experiment=exp)
    normal = reference_run(cfg)
    assert_equals_reference(from_folders, exp.server.state_dict(), normal, exact_accuracy=True, traffic=True)


@pytest.fixture
def flower_node():
    """Calls the real ClientApp in this process for a SuperNode with the given node config."""
    pytest.importorskip("flwr")
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlorm.flower import client, clientapp
    from fedlorm.flower.settings import FlowerSettings, run_config_for

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    logger = logging.getLogger("fedlorm")  # the ClientApp routes it to Flower's handlers
    saved = (list(logger.handlers), logger.level, logger.propagate)
    threads = torch.get_num_threads()
    run_config = run_config_for(tiny_config(), FlowerSettings(out="", federated_eval=False))

    def call(node_config, content, kind):
        context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                          run_config=run_config)
        return clientapp.app(Message(content, dst_node_id=7, message_type=kind), context)

    yield call
    logger.handlers[:], logger.level, logger.propagate = saved
    torch.set_num_threads(threads)
    client._CACHE.clear()


def test_a_node_with_data_dir_reads_only_its_folder_and_replies_the_same_bits(
    written, monkeypatch, flower_node
):
    from flwr.app import ConfigRecord, MessageType, RecordDict

    from fedlorm.flower import client
    from fedlorm.flower.messages import ARRAYS, CONFIG, decode_train_reply, to_array_record

    cfg = tiny_config()
    full = build_experiment(cfg)
    classes = full.scenario.task_classes(0)
    full.server.start_task(0, classes, torch_generator(cfg.seed, "server"))
    instruction = next(iter(full.server.instructions(0, classes)))
    arrays = full.server.arrays(instruction)
    expected = client.local_update(full, 1, instruction, arrays)

    def no_dataset(*args, **kwargs):
        raise AssertionError("a node with data-dir must not load a dataset")

    monkeypatch.setattr(experiment_module, "load_split", no_dataset)
    content = RecordDict({ARRAYS: to_array_record(arrays), CONFIG: ConfigRecord(instruction.to_record())})
    node = {"partition-id": 1, "num-partitions": 3, "data-dir": str(written / "client-1")}
    reply = flower_node(node, content, MessageType.TRAIN)
    assert not reply.has_error(), reply.error.reason
    got = decode_train_reply(reply.content)
    assert got.partition == 1 and got.reply.num_examples == expected.num_examples
    assert got.reply.summands.keys() == expected.summands.keys()
    assert all(torch.equal(got.reply.summands[k], expected.summands[k]) for k in expected.summands)

    exp = node_experiment(cfg, written / "client-1", 1)
    assert exp.scenario == full.scenario and exp.class_names == full.class_names and len(exp.train) == 0
    with pytest.raises(ValueError, match="holds client 1's data only"):
        exp.client_share(0, 2)


def test_a_bad_folder_makes_the_node_refuse_with_setup_and_log_the_one_line_reason(
    written, tmp_path, flower_node
):
    """The error reply says only ``setup`` (no path leaves the node); the node's own log has the reason."""
    from flwr.app import ConfigRecord, MessageType, RecordDict

    from fedlorm.flower.messages import ARRAYS, CONFIG, to_array_record

    content = RecordDict({ARRAYS: to_array_record({"w": torch.zeros(2)}), CONFIG: ConfigRecord({"task": 0})})
    missing = tmp_path / "nowhere"
    cases = [
        (missing, 0, f"partition folder {str(missing)!r} does not exist"),
        (
            written / "client-2",
            0,
            f"partition folder {str(written / 'client-2')!r} holds the data of client 2, not of client 0",
        ),
    ]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    node_log = logging.getLogger("fedlorm.flower.clientapp")
    node_log.addHandler(handler)
    try:
        for folder, partition, reason in cases:
            node = {"partition-id": partition, "num-partitions": 3, "data-dir": str(folder)}
            for kind in (MessageType.TRAIN, MessageType.EVALUATE):
                records.clear()
                reply = flower_node(node, content, kind)
                assert reply.has_error() and reply.error.reason == "setup"
                assert [r.getMessage() for r in records] == [f"this node cannot take part: {reason}"]
    finally:
        node_log.removeHandler(handler)


# -- bad folders -----------------------------------------------------------------------------------
def _garbage_task(folder: Path, keep_checksum: bool) -> None:
    (folder / "task-0.safetensors").write_bytes(b"\x00not a safetensors file")
    if not keep_checksum:
        manifest = json.loads((folder / MANIFEST).read_text())
        for entry in manifest["tasks"]:
            entry.pop("sha256")
        (folder / MANIFEST).write_text(json.dumps(manifest))


BAD_FOLDERS = {
    "missing": (lambda f: shutil.rmtree(f), "does not exist"),
    "empty": (lambda f: [p.unlink() for p in f.iterdir()], "is empty; write it with `fedlorm partition`"),
    "no manifest": (lambda f: (f / MANIFEST).unlink(), "has no manifest.json"),
    "manifest not json": (
        lambda f: (f / MANIFEST).write_text("{"),
        "has an unreadable manifest.json: Expecting property name",
    ),
    "manifest of another format": (
        lambda f: (f / MANIFEST).write_text('{"format": "other"}'),
        "has a malformed manifest.json: format is 'other'",
    ),
    "task file missing": (lambda f: (f / "task-1.safetensors").unlink(), "is missing task-1.safetensors"),
    "task file corrupted": (
        lambda f: _garbage_task(f, keep_checksum=True),
        "has a corrupted task-0.safetensors (its SHA-256 differs from the one in manifest.json)",
    ),
    "task file unreadable": (
        lambda f: _garbage_task(f, keep_checksum=False),
        "has an unreadable task-0.safetensors: ",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_a_bad_folder_is_a_one_line_error_naming_it(written, tmp_path, case):
    folder = _broken_copy(written, tmp_path)
    damage, message = BAD_FOLDERS[case]
    damage(folder)
    with pytest.raises(ValueError) as err:
        load_partition(folder, tiny_config(), 0)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"partition folder {str(folder)!r} {message}"), text


def test_a_folder_of_another_run_or_client_is_refused(written):
    folder = written / "client-1"
    with pytest.raises(ValueError) as err:
        load_partition(folder, tiny_config("seed=3"), 1)
    assert str(err.value) == (
        f"partition folder {str(folder)!r} was written for another run (seed = 0 there, 3 here)"
    )
    with pytest.raises(ValueError, match=r"data.train_per_class = 8 there, 9 here"):
        load_partition(folder, tiny_config("data.train_per_class=9"), 1)
    with pytest.raises(ValueError) as err:
        load_partition(folder, tiny_config(), 0)
    assert str(err.value) == f"partition folder {str(folder)!r} holds the data of client 1, not of client 0"
    with pytest.raises(ValueError, match=r"has no manifest.json \(it holds client-0/: give the participant"):
        load_partition(written, tiny_config(), 0)
    # The method and the server's test size do not decide a client's data.
    assert len(load_partition(folder, tiny_config("method=fedavg", "data.test_per_class=3"), 1)) == 2


def test_a_hand_made_folder_is_checked_for_structure_only(tmp_path):
    """The layout docs/partitions.md describes, written with plain safetensors and json."""
    folder = tmp_path / "client-0"
    folder.mkdir()
    spans = [[0, 5], [5, 10]]
    for task, (start, stop) in enumerate(spans):
        labels = torch.arange(start, stop).repeat(2)
        images = torch.randint(0, 256, (len(labels), 1, 28, 28), dtype=torch.uint8)
        save_file({"images": images, "labels": labels}, str(folder / f"task-{task}.safetensors"))
    manifest = {
        "format": "fedlorm-partition",
        "version": 1,
        "client": 0,
        "num_clients": 3,
        "num_tasks": 2,
        "class_order": list(range(10)),
        "task_classes": spans,
        "class_names": [f"digit {c}" for c in range(10)],
        "fingerprint": None,
        "tasks": [{"file": f"task-{t}.safetensors"} for t in range(2)],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    shares = load_partition(folder, tiny_config("seed=5"), 0)
    assert [len(s) for s in shares] == [10, 10] and int(shares[1].labels.min()) == 5
    with pytest.raises(ValueError, match="is one of 3 clients, but the run has 4"):
        load_partition(folder, tiny_config("scenario.num_clients=4"), 0)
    save_file(
        {"images": torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "labels": torch.tensor([7])},
        str(folder / "task-0.safetensors"),
    )
    with pytest.raises(ValueError, match=r"task-0.safetensors with labels outside .* positions 0\.\.4"):
        read_partition(folder, 0)


def test_writing_is_all_or_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    spans = [range(0, 2)]
    task = [(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))]

    def folders():
        common = {"num_clients": 2, "class_order": [0, 1], "task_classes": spans, "class_names": ["a", "b"]}
        yield make_manifest(0, split="train", config={"seed": 0}, **common), task
        yield make_manifest(1, split="train", config={"seed": 0}, **common), task
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_partitions(out, folders())
    assert list(out.iterdir()) == []
    assert partition_store.folder_name(SERVER) == "server"


# -- the command ------------------------------------------------------------------------------------
def test_the_command_refuses_a_non_empty_out_unless_overwrite(written, capsys, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in written.rglob("*")}
    code, out, err = _cli(capsys, "partition", "--out", str(written), *TINY)
    assert (code, out) == (2, "")
    listed = "(client-0, client-1, client-2, …); pass --overwrite"
    assert err.startswith(f"fedlorm: error: --out {str(written)!r} is not empty {listed}")
    assert {p: p.stat().st_mtime_ns for p in written.rglob("*")} == before

    again = tmp_path / "again"
    (again / "client-7").mkdir(parents=True)
    (again / "notes.txt").write_text("mine")
    code, out, err = _cli(capsys, "partition", "--out", str(again), "--overwrite", *TINY)
    assert code == 0, err
    assert out.strip() == f"wrote 3 client folders and server/ to {again}"
    names = sorted(p.name for p in again.iterdir())
    assert names == ["client-0", "client-1", "client-2", "notes.txt", "server"]
    for name in ("client-2", "server"):
        for file in (written / name).iterdir():
            assert (again / name / file.name).read_bytes() == file.read_bytes()


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda t: ["--out", str(_file(t) / "x")], "cannot be created: {file!r} is a file, not a directory"),
        (lambda t: ["--out", str(_file(t))], "--out {file!r} exists and is not a directory"),
        (lambda t: ["--preset", "nope", "--out", str(t / "o")], "preset 'nope' is unknown"),
        (lambda t: ["--out", str(t / "o"), "scenario.beta=0"], "scenario.beta = 0.0"),
        (lambda t: ["--out", str(t / "o"), "train.roundz=1"], "unknown config key 'train.roundz'"),
        (lambda t: ["--out", str(t / "o"), "method=nope"], "method 'nope' is unknown"),
        (lambda t: [], "the following arguments are required: --out"),
    ],
    ids=["below-a-file", "a-file", "preset", "value", "key", "method", "no-out"],
)
def test_bad_command_input_is_one_line_exit_2(capsys, tmp_path, args, message):
    code, out, err = _cli(capsys, "partition", *args(tmp_path))
    assert (code, out) == (2, "")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedlorm: error: "), err
    assert message.format(file=str(tmp_path / "a-file")) in lines[0]
    assert not (tmp_path / "o").exists()


def test_an_unwritable_out_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: let the check see what a user would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and access(p, mode))
    code, _, err = _cli(capsys, "partition", "--out", str(locked / "o"), *TINY)
    assert code == 2 and err.strip() == (
        f"fedlorm: error: --out {str(locked / 'o')!r} cannot be created: {str(locked)!r} is not writable"
    )


def test_with_a_validation_split_the_server_folder_holds_it(tmp_path):
    cfg = tiny_config("data.validation_per_class=3")
    write_run_partitions(cfg, tmp_path / "v")
    data = build_data(effective_config(cfg))
    server = load_partition(tmp_path / "v" / SERVER, cfg, SERVER)
    assert [len(s) for s in server] == [15, 15] and len(data.test) == 30
    assert json.loads((tmp_path / "v" / SERVER / MANIFEST).read_text())["split"] == "validation"
    share = load_partition(tmp_path / "v" / "client-2", cfg, 2)[1]
    assert torch.equal(share.images, data.train.images[data.partitions[1][2]])
    with pytest.raises(ValueError, match=r"data\.validation_per_class = 3 there, null here"):
        load_partition(tmp_path / "v" / "client-2", tiny_config(), 2)


def test_the_command_takes_the_log_options():
    from fedlorm.cli import _build_parser
    from fedlorm.logs import log_level

    assert log_level(_build_parser().parse_args(["partition", "--out", "x", "-v"])) == logging.INFO


def test_a_joint_run_gets_one_client_of_one_task():
    cfg = apply_overrides(tiny_config(), ["method=joint"])
    assert data_config(cfg, 0)["scenario.num_clients"] == 1 and data_config(cfg, 0)["scenario.tasks"] == 1
