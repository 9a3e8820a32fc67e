"""`vlm tokenizer train` and command-line usage errors."""

from input_pipeline import tokenizer
from tests.helpers import run_vlm


def test_tokenizer_train_command(tmp_path):
    captions = tmp_path / "captions.txt"
    words = ["red", "blue", "green", "circle", "square", "moves", "left", "right", "slowly", "quickly"]
    lines = [f"a {words[i % 3]} {words[3 + i % 2]} {words[5]} {words[6 + i % 2]} {words[8 + i % 2]}" for i in range(200)]
    captions.write_text("\n".join(lines) + "\n\n")
    proc = run_vlm("tokenizer", "train", f"--input={captions}", "--vocab_size=48", f"--output={tmp_path}/spm")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {tmp_path}/spm.model" in proc.stdout
    tok = tokenizer.Tokenizer(str(tmp_path / "spm.model"))
    ids = tok.encode([lines[0]], max_len=32)
    assert tok.decode(ids[0]) == lines[0]


def test_tokenizer_missing_input_is_one_line(tmp_path):
    proc = run_vlm("tokenizer", "train", f"--input={tmp_path}/nope.txt", "--vocab_size=48", f"--output={tmp_path}/spm")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: caption file not found: {tmp_path}/nope.txt"]


def test_unknown_command_and_missing_flag():
    proc = run_vlm("fly")
    assert proc.returncode == 2 and "unknown command 'fly'" in proc.stderr
    proc = run_vlm("eval")
    assert proc.returncode == 2 and "missing --workdir" in proc.stderr
