"""bench/bench_compressors.py on the tiny synthetic val shard: the text is the bytes BPB counts, codecs roundtrip."""
import json
from pathlib import Path

import pytest
import torch

import bench_compressors as bc  # conftest puts bench/ on sys.path
import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def luts(sp):
    return tg.build_bpb_luts(sp, sp.vocab_size())


@pytest.fixture(scope="module")
def val_pattern(dataset):
    return tg.Hyperparameters(data_path=dataset["data_path"]).val_files


@pytest.mark.parametrize("seq_len", [7, 32, 100])
def test_text_bytes_equal_token_bytes_of_scored_targets(val_pattern, sp, luts, seq_len):
    # Different trims cut the last document at different places (mid-document, mid-word).
    val = tg.load_val_tokens(val_pattern, seq_len)
    text, n_bytes = bc.scored_text(val, sp, luts)
    expected = sum(int(tg.token_bytes(val[i - 1:i].long(), val[i:i + 1].long(), luts)) for i in range(1, val.numel()))
    assert len(text) == n_bytes == expected > 0
    text.decode("utf-8")


def test_text_without_leading_bos_counts_the_first_targets_space(sp, luts):
    # val[0] is not a target: with a non-boundary val[0], the "▁" of val[1] is a byte decode would drop.
    ids = sp.encode("to be or not to be")
    k = next(i for i in range(1, len(ids)) if sp.id_to_piece(ids[i]).startswith("\u2581"))
    words = ids[k - 1:]
    with pytest.raises(ValueError, match="UTF-8 bytes but token_bytes counts"):
        bc.scored_text(torch.tensor(words + [tg.BOS_ID] + words, dtype=torch.int32), sp, luts)
    text, _ = bc.scored_text(torch.tensor([tg.BOS_ID] + words, dtype=torch.int32), sp, luts)
    assert text == sp.decode(words).encode("utf-8")


def test_every_available_codec_roundtrips_and_bpb_is_8_size_over_bytes(val_pattern, sp, luts):
    text, n_bytes = bc.scored_text(tg.load_val_tokens(val_pattern, 32), sp, luts)
    codecs, notes = bc.available_codecs(install_7z=False)
    assert {"gzip", "bzip2", "xz"} <= {c.name for c in codecs}
    for c in codecs:
        blob = c.compress(text)
        assert c.decompress(blob) == text, c.name
        assert len(blob) < len(text), c.name  # English text compresses under every one of them
        row = bc.measure(c, text, n_bytes)
        assert row["bytes"] == len(blob) and row["bpb"] == 8 * len(blob) / n_bytes, c.name
    if not any(c.name == "7z PPMd" for c in codecs):
        assert any("7z" in n for n in notes)
    assert any(c.name == "zpaq" for c in codecs) or any("zpaq" in n for n in notes)


def test_final_score_parser_reads_the_last_score_and_val_tokens(tmp_path):
    log = tmp_path / "run.txt"
    log.write_text("train_shards:3 val_tokens:12345\nfinal_score val_loss:9.0 val_bpb:9.0 eval_time:1ms\n"
                   "final_score val_loss:3.29290715 val_bpb:2.14070909 eval_time:160634ms\n")
    assert bc.parse_final_score(log) == dict(log=str(log), val_loss=3.29290715, val_bpb=2.14070909, val_tokens=12345)
    unfinished = tmp_path / "unfinished.txt"
    unfinished.write_text("step:1/10 train_loss:6.9\nfinal_float val_loss:3.4 val_bpb:2.2 eval_time:1ms\n")
    with pytest.raises(ValueError, match="unfinished.txt has no 'final_score"):
        bc.parse_final_score(unfinished)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        bc.parse_final_score(tmp_path / "missing.txt")


def test_cli_prints_the_table_and_writes_json(dataset, tmp_path, capsys):
    log = tmp_path / "run.txt"
    log.write_text("final_score val_loss:1.0 val_bpb:0.5 eval_time:1ms\n")
    out = tmp_path / "out.json"
    assert bc.main(["--data-path", dataset["data_path"], "--tokenizer", dataset["tokenizer_path"], "--log", str(log),
                    "--json", str(out), "--no-install"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["val"]["text_bytes"] == data["val"]["token_bytes"] > 0
    assert {r["name"] for r in data["compressors"]} >= {"gzip", "bzip2", "xz"}
    for row in data["compressors"]:
        assert f"{row['bytes']:>10} {row['bpb']:>8.5f}" in printed
    assert "lowest bpb: run run.txt (0.50000)" in printed
    with pytest.raises(FileNotFoundError, match="nowhere is not a folder"):
        bc.main(["--data-path", str(tmp_path / "nowhere"), "--no-install"])
    with pytest.raises(FileNotFoundError, match=f"no shards match {tmp_path}"):
        bc.main(["--data-path", str(tmp_path), "--tokenizer", dataset["tokenizer_path"], "--no-install"])
    with pytest.raises(FileNotFoundError, match="no.model does not exist"):
        bc.main(["--data-path", dataset["data_path"], "--tokenizer", str(tmp_path / "no.model"), "--no-install"])
