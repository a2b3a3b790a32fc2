import sys
sys.path.insert(0, "tests")
import test_resume as tr
import lightfn as lf
class P(lf.callbacks.Callback):
    def on_announce(self, ctx, text):
        print(f"[step {ctx.step}] {text}", flush=True); return True
orig = tr.w.make_callbacks
tr.w.make_callbacks = lambda d, jit=False: orig(d, jit=jit) + [P()]
def test_a(tmp_path):
    tr.test_compiled_run_killed_mid_epoch_resumes_bit_identical(tmp_path)
def test_x(tmp_path, monkeypatch):
    tr.test_background_compiled_run_killed_after_its_switch_resumes_bit_identical(tmp_path, monkeypatch)
