"""Readers never fail because of a writer: a read that overlaps a commit gets the old or the new
generation, whole, never an error."""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np

from fusion import Store
from fusion.store import faults

from .helpers import OPTS, equal_models, models

REPO = Path(__file__).resolve().parents[3]


def test_a_decouple_that_overlaps_a_commit_reads_the_new_generation(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], **OPTS)
    read_once, committed, results = threading.Event(), threading.Event(), {}

    def pause_first_reader():
        if threading.current_thread().name == "reader" and not read_once.is_set():
            read_once.set()
            committed.wait(timeout=60)  # the writer commits (and deletes the old files) meanwhile

    def reader():
        results["model"] = Store.open(store.path, kernel="reference").load_task(1)

    with faults.inject("manifest-read", pause_first_reader):
        thread = threading.Thread(target=reader, name="reader")
        thread.start()
        assert read_once.wait(timeout=60)
        store.add(paths[2])  # generation 1 replaces every file of generation 0
        committed.set()
        thread.join(timeout=60)
    assert equal_models(results["model"], store.load_task(1))


READER = textwrap.dedent("""
    import sys, numpy as np
    from fusion import Store
    store, rounds = Store.open(sys.argv[1], kernel="reference"), 0
    while rounds < int(sys.argv[2]):
        model = store.load_task(1)  # never an error, whatever the writer is doing
        assert np.isfinite(model["embed.weight"]).all()
        rounds += 1
    print("ok", rounds)
""")


def test_a_reader_process_beside_a_busy_writer_never_fails(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], **OPTS)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(store.path), "150"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while reader.poll() is None:  # add and remove task 3 over and over while the reader reads
        store.add(paths[2], name="churn")
        store.remove("churn")
    out, err = reader.communicate()
    assert reader.returncode == 0 and out.startswith("ok 150"), err
    assert np.isfinite(store.load_task(1)["embed.weight"]).all()
