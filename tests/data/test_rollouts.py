"""Rollout capture format: round trip, size bounds, atomic writes, clear errors."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from stapo.data.rollouts import (
    RolloutCapWarning,
    RolloutError,
    read_rollouts,
    rollout_files,
    write_rollouts,
)


def _record(n_tokens: int, seed: int, advantage: float = 0.5, **over):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(2.0, n_tokens).astype(np.float32)
    rec = {
        "prompt": f"prompt {seed // 4}",
        "completion": f"completion {seed}",
        "reward": 1.0 if advantage > 0 else 0.0,
        "advantage": advantage,
        "token_ids": rng.integers(0, 1000, n_tokens),
        "token_texts": [f"t{i}" for i in range(n_tokens)],
        "logprobs": lp,
        "entropy": rng.uniform(0, 3, n_tokens).astype(np.float32),
        "collision": rng.uniform(0.05, 1, n_tokens).astype(np.float32),
        "s2t": rng.random(n_tokens) < 0.2,
    }
    rec.update(over)
    return rec


def test_round_trip_values_and_layout(tmp_path):
    records = [_record(n, seed=i, advantage=(-1) ** i * 0.7) for i, n in enumerate([5, 0, 9, 3])]
    res = write_rollouts(tmp_path, 7, records, metadata={"tau_p": 0.01, "tau_h": 0.2})
    assert res.path == tmp_path / "rollouts" / "step_00000007.parquet"
    assert (res.samples_written, res.samples_dropped) == (4, 0)
    assert res.bytes_written == res.path.stat().st_size
    # no temporary file is left next to the capture
    assert sorted(p.name for p in res.path.parent.iterdir()) == ["step_00000007.parquet"]
    umask = os.umask(0)
    os.umask(umask)
    assert res.path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600

    ro = read_rollouts(tmp_path)  # a run directory
    assert ro.num_samples == 4 and ro.num_tokens == 17
    assert ro.offsets.tolist() == [0, 5, 5, 14, 17]
    assert ro.step.tolist() == [7] * 4 and ro.sample.tolist() == [0, 1, 2, 3]
    assert ro.prompt == [r["prompt"] for r in records]
    assert ro.metadata[7]["tau_p"] == 0.01 and ro.metadata[7]["tau_h"] == 0.2
    for i, r in enumerate(records):
        sl = ro.token_slice(i)
        np.testing.assert_array_equal(ro.token_id[sl], r["token_ids"])
        np.testing.assert_array_equal(ro.logprob[sl], r["logprobs"])  # float32 kept exactly
        np.testing.assert_array_equal(ro.collision[sl], r["collision"])
        np.testing.assert_array_equal(ro.s2t[sl], r["s2t"])
        assert ro.token_text[sl] == r["token_texts"]
        assert ro.advantage[i] == np.float32(r["advantage"])

    # compact storage: zstd everywhere, float32 / int32 leaves, dictionary-encoded strings
    meta = pq.ParquetFile(res.path).metadata
    cols = {meta.row_group(0).column(j).path_in_schema: meta.row_group(0).column(j) for j in range(meta.num_columns)}
    assert all(c.compression == "ZSTD" for c in cols.values())
    assert cols["prompt"].physical_type == "BYTE_ARRAY"
    assert "RLE_DICTIONARY" in cols["token_text.list.element"].encodings
    assert cols["logprob.list.element"].physical_type == "FLOAT"
    assert cols["token_id.list.element"].physical_type == "INT32"


def test_grad_proxy_on_read_hand_worked(tmp_path):
    # p = 0.5, Σπ² = 0.5  -> 1 - 1 + 0.5 = 0.5 ;  p = 0.01, Σπ² = 0.9 -> 1 - 0.02 + 0.9 = 1.88
    rec = _record(2, 0, logprobs=[math.log(0.5), math.log(0.01)], collision=[0.5, 0.9])
    write_rollouts(tmp_path / "x.parquet", 0, [rec])
    ro = read_rollouts(tmp_path / "x.parquet")
    np.testing.assert_allclose(ro.grad_proxy, [0.5, 1.88], rtol=1e-6)


def test_padded_tensors(tmp_path):
    records = [_record(3, 0), _record(1, 1, advantage=-0.2)]
    write_rollouts(tmp_path, 0, records)
    pad = read_rollouts(tmp_path).padded()
    assert pad["logprobs"].shape == (2, 3)
    assert pad["response_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert pad["logprobs"][1, 0].item() == pytest.approx(float(records[1]["logprobs"][0]))
    assert pad["advantages"].tolist() == pytest.approx([0.5, -0.2])


def test_several_steps_sorted_and_selected(tmp_path):
    for step in (10, 2, 100):
        write_rollouts(tmp_path, step, [_record(2, step)])
    files = rollout_files(tmp_path / "rollouts")
    assert [f.name for f in files] == ["step_00000002.parquet", "step_00000010.parquet", "step_00000100.parquet"]
    assert read_rollouts(tmp_path).step.tolist() == [2, 10, 100]
    assert read_rollouts(tmp_path, steps=[10]).step.tolist() == [10]


def test_max_samples_drops_with_counted_warning(tmp_path):
    records = [_record(4, i) for i in range(10)]
    with pytest.warns(RolloutCapWarning, match="dropped 7 of 10 samples"):
        res = write_rollouts(tmp_path, 1, records, max_samples=3)
    assert (res.samples_written, res.samples_dropped) == (3, 7)
    ro = read_rollouts(tmp_path)
    assert ro.completion == [r["completion"] for r in records[:3]]


def test_max_bytes_drops_whole_step(tmp_path):
    first = write_rollouts(tmp_path, 0, [_record(50, i) for i in range(4)], max_bytes=None)
    cap = first.bytes_written + 100  # room for the first file only
    with pytest.warns(RolloutCapWarning, match="dropped 4 of 4 samples.*max_bytes"):
        res = write_rollouts(tmp_path, 1, [_record(50, i) for i in range(4)], max_bytes=cap)
    assert res.path is None and res.samples_written == 0 and res.samples_dropped == 4
    assert [f.name for f in (tmp_path / "rollouts").iterdir()] == ["step_00000000.parquet"]
    # rewriting the same step replaces its file, so its own old size does not count against the cap
    res = write_rollouts(tmp_path, 0, [_record(50, i) for i in range(4)], max_bytes=cap)
    assert res.samples_written == 4


@pytest.mark.parametrize(
    "over, match",
    [
        ({"logprobs": [0.0, -1.0]}, "'logprob' has 2 values but token_id has 3"),
        ({"entropy": [0.1, float("nan"), 0.2]}, "'entropy' contains non-finite"),
        ({"reward": "high"}, "'reward' must be a number"),
        ({"prompt": 3}, "'prompt' must be a string"),
        ({"logprobs": [0.5, -1.0, -2.0]}, "positive values"),
        ({"step": 4}, "'step' is 4 but the capture step is 3"),
    ],
)
def test_bad_records_name_the_field(tmp_path, over, match):
    with pytest.raises(RolloutError, match=match):
        write_rollouts(tmp_path, 3, [_record(3, 0), _record(3, 1, **over)])
    assert not list((tmp_path / "rollouts").glob("*"))  # nothing half-written


def test_missing_field(tmp_path):
    rec = _record(3, 0)
    del rec["collision"]
    with pytest.raises(RolloutError, match=r"record 0 \(step 0\): missing field\(s\) collision"):
        write_rollouts(tmp_path, 0, [rec])


def test_read_errors(tmp_path):
    with pytest.raises(RolloutError, match="no such rollout"):
        read_rollouts(tmp_path / "nope")
    (tmp_path / "rollouts").mkdir()
    with pytest.raises(RolloutError, match="no rollout files"):
        read_rollouts(tmp_path)
    bad = tmp_path / "rollouts" / "step_00000001.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(RolloutError, match="not a readable Parquet file"):
        read_rollouts(tmp_path)
    import pyarrow as pa

    pq.write_table(pa.table({"a": [1]}), bad)
    with pytest.raises(RolloutError, match="not a stapo rollout file"):
        read_rollouts(bad)


def test_append_across_calls_and_cap_per_step(tmp_path):
    # one call per micro-batch: samples accumulate in the step's file, the cap counts all calls
    write_rollouts(tmp_path, 5, [_record(2, i, sample=i) for i in range(3)], max_samples=5)
    with pytest.warns(RolloutCapWarning, match="dropped 1 of 3 samples"):
        res = write_rollouts(tmp_path, 5, [_record(2, i, sample=i) for i in range(3, 6)], max_samples=5)
    assert (res.samples_written, res.samples_dropped) == (2, 1)
    ro = read_rollouts(tmp_path)
    assert ro.sample.tolist() == [0, 1, 2, 3, 4]
    # re-capturing sample 1 (a resumed run) replaces it instead of duplicating it
    write_rollouts(tmp_path, 5, [_record(4, 99, sample=1)], max_samples=5)
    ro = read_rollouts(tmp_path)
    assert sorted(ro.sample.tolist()) == [0, 1, 2, 3, 4]
    i = ro.sample.tolist().index(1)
    assert ro.completion[i] == "completion 99" and ro.lengths()[i] == 4
    # append=False replaces the whole step
    write_rollouts(tmp_path, 5, [_record(1, 7)], append=False)
    assert read_rollouts(tmp_path).num_samples == 1


def test_optional_reward_and_aliases(tmp_path):
    rec = _record(3, 0)
    rec.pop("reward")
    rec["tokens"] = rec.pop("token_texts")
    write_rollouts(tmp_path, 0, [rec])
    ro = read_rollouts(tmp_path)
    assert np.isnan(ro.reward[0]) and ro.token_text == ["t0", "t1", "t2"]


def test_torch_tensor_records(tmp_path):
    torch = pytest.importorskip("torch")
    lp = torch.tensor([-0.1, -3.0, -0.0], requires_grad=True) * 1.0  # a graph-attached tensor
    rec = _record(3, 0, logprobs=lp, entropy=torch.tensor([0.5, 0.2, 0.0], dtype=torch.bfloat16),
                  collision=torch.tensor([0.8, 0.9, 1.0], dtype=torch.float64), s2t=torch.tensor([False, True, False]),
                  token_ids=torch.tensor([1, 2, 3]))
    write_rollouts(tmp_path, 2, [rec])
    ro = read_rollouts(tmp_path)
    np.testing.assert_allclose(ro.logprob, [-0.1, -3.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(ro.entropy, [0.5, 0.2, 0.0], rtol=1e-2)
    assert ro.s2t.tolist() == [False, True, False] and ro.token_id.tolist() == [1, 2, 3]
