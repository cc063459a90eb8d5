"""Engine and command line: the contract, errors, cache, sampling, EOS, multi-worker."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mlc_course import compile as mcompile
from mlc_course.config import PRESETS
from mlc_course.engine import Engine, EngineError, sample

PY = sys.executable


def cli(*args, timeout=600):
    return subprocess.run([PY, "-m", "mlc_course", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny():
    with Engine("tiny", "q4f32_1", quiet=True) as eng:
        yield eng


def test_sampling_with_seed_is_reproducible(tiny):
    a = tiny.generate([1, 2, 3], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5).output_ids
    b = tiny.generate([1, 2, 3], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5).output_ids
    c = tiny.generate([1, 2, 3], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=6).output_ids
    assert a == b and len(a) == 12
    assert a != c


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = {sample(logits, 1.0, 0.7, rng) for _ in range(300)}
    assert draws == {0, 1}
    assert sample(logits, 0.0, 1.0, rng) == 0


def test_eos_stops_generation(tiny):
    free = tiny.generate([4, 5, 6], max_new_tokens=10).output_ids
    stop = free[3]
    out = tiny.generate([4, 5, 6], max_new_tokens=10, stop_ids=(stop,)).output_ids
    assert out == free[:free.index(stop) + 1]  # stops after the first stop id, which is included


def test_prompt_longer_than_context(tiny):
    with pytest.raises(EngineError, match="context window"):
        tiny.generate(list(range(5)) * 60, max_new_tokens=4)


def test_unknown_model_and_scheme():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        Engine("no-such-model", quiet=True)
    with pytest.raises(ValueError, match="unknown quantization scheme 'q5f16_9'"):
        Engine("tiny", "q5f16_9", quiet=True)
    with pytest.raises(ValueError, match="shapes only"):
        Engine("llama2-7b", quiet=True)


def test_cache_invalidation_and_corrupt_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_COURSE_CACHE", str(tmp_path))
    cfg = PRESETS["tiny"]
    p1 = mcompile.build_model(cfg, "q0f32", 1, quiet=True)
    mtime = p1.stat().st_mtime_ns
    assert mcompile.build_model(cfg, "q0f32", 1, quiet=True) == p1 and p1.stat().st_mtime_ns == mtime
    # anything in the key changes the entry
    assert mcompile.library_path(cfg.with_(num_layers=3), "q0f32", 1, mcompile.cpu_target()) != p1
    assert mcompile.library_path(cfg, "q4f32_1", 1, mcompile.cpu_target()) != p1
    assert mcompile.library_path(cfg, "q0f32", 2, mcompile.cpu_target()) != p1
    monkeypatch.setattr(mcompile, "_source_digest", lambda: "changed-source")
    assert mcompile.library_path(cfg, "q0f32", 1, mcompile.cpu_target()) != p1
    monkeypatch.undo()
    monkeypatch.setenv("MLC_COURSE_CACHE", str(tmp_path))
    p1.unlink()  # (a loaded library must not be overwritten in place)
    p1.write_bytes(b"not a shared library")
    assert mcompile.build_model(cfg, "q0f32", 1, quiet=True) == p1
    import tvm
    tvm.runtime.load_module(str(p1))  # rebuilt, loads


def test_tp_matches_tp1_on_tiny():
    prompt = [9, 8, 7, 6, 5]
    with Engine("tiny", "q0f32", quiet=True) as e1:
        ref = [e1.prefill(prompt)] + [e1.decode(t) for t in (1, 2, 3)]
    for n in (2, 4):
        with Engine("tiny", "q0f32", shards=n, session="thread", quiet=True) as en:
            got = [en.prefill(prompt)] + [en.decode(t) for t in (1, 2, 3)]
        for a, b in zip(ref, got):
            assert np.abs(a - b).max() < 1e-4


def test_generate_json_contract():
    r = cli("generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out) == ["model", "quantization", "shards", "device", "prompt_ids", "output_ids", "text",
                         "prefill_tok_per_s", "decode_tok_per_s"]
    assert out["quantization"] == "q4f32_1" and out["shards"] == 1 and out["device"] == "cpu"
    assert 1 <= len(out["output_ids"]) <= 8 and out["decode_tok_per_s"] > 0


def test_shards_3_equals_shards_1_and_2_fails_cleanly():
    args = ["generate", "--prompt", "Tell me about the moon.", "--chat", "--max-new-tokens", "12", "--json"]
    one = json.loads(cli(*args, "--shards", "1").stdout)
    three = json.loads(cli(*args, "--shards", "3").stdout)
    assert one["output_ids"] == three["output_ids"]
    r = cli(*args, "--shards", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "KV heads" in r.stderr and "1, 3" in r.stderr


def test_cuda_without_gpu_is_a_clear_error():
    r = cli("generate", "--prompt", "hi", "--device", "cuda")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "GPU" in r.stderr


def test_killed_worker_ends_session_within_seconds():
    code = (
        "import os, signal, time, psutil\n"
        "from mlc_course.engine import Engine\n"
        "eng = Engine('tiny', 'q0f32', shards=2, quiet=True)\n"
        "eng.generate([1, 2, 3], max_new_tokens=2)\n"
        "kids = [p for p in psutil.Process().children(recursive=True) if 'disco_worker' in ' '.join(p.cmdline())]\n"
        "os.kill(kids[-1].pid, signal.SIGKILL)\n"
        "time.sleep(0.5)\n"
        "from mlc_course.engine import EngineError\n"
        "try:\n"
        "    eng.generate([1, 2, 3], max_new_tokens=20)\n"
        "except EngineError as e:\n"
        "    print('ERROR', e)\n"
    )
    t0 = time.time()
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "ERROR disco worker process" in r.stdout and "has died" in r.stdout
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr
    assert time.time() - t0 < 60


def test_chat_session_reset_and_exit():
    r = subprocess.run([PY, "-m", "mlc_course", "chat", "--max-new-tokens", "8"], input="Hi!\n/reset\nName a color.\n/exit\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("bot> ") == 2 and "(conversation cleared)" in r.stderr
