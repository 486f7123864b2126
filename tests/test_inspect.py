"""mote-inspect: op histogram and weight storage before / after the pass pipeline."""
import json

from mote.tools import inspect_model


def test_inspect_reports_rewrites_and_storage(make_model_dir, capsys):
    d = make_model_dir(layers=2, experts=4)
    assert inspect_model.main([str(d), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    dec = report["text_decoder"]
    assert dec["before"]["ops"].get("mote.moe_ffn", 0) == 0 and dec["after"]["ops"]["mote.moe_ffn"] == 2
    # Latent fp32 experts on disk are packed as they are read: the traced program already holds 2-bit codes.
    assert 2.0 <= dec["before"]["storage"]["routed_expert_bits_per_weight"] < 2.1
    assert 2.0 <= dec["after"]["storage"]["routed_expert_bits_per_weight"] < 2.1     # packed trits + scales
    assert "uint8" in dec["after"]["storage"]["bytes_by_dtype"]
    assert dec["max_abs_diff"] == 0.0


def test_inspect_text_table_and_bad_input(make_model_dir, tmp_path, capsys):
    d = make_model_dir(layers=1)
    assert inspect_model.main([str(d)]) == 0
    out = capsys.readouterr().out
    assert "mote.moe_ffn" in out and "routed experts 2.0" in out
    assert inspect_model.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]
