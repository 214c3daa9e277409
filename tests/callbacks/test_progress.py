"""RunProgress: plain lines with step / max_steps, the run's numbers and an ETA off a terminal; a bar on one."""

import lightning as L
import torch

from qoq.callbacks.progress import RunProgress


class _Logs(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        self.log("train/reward", 0.25 + 0.01 * self.global_step)
        self.log("train/kl", 0.002)
        return (self.w - 1) ** 2

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, bar: RunProgress) -> None:
    L.Trainer(max_steps=4, callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False,
              default_root_dir=tmp_path, log_every_n_steps=1).fit(_Logs())


def test_plain_lines_every_n_steps(tmp_path, capsys) -> None:
    _fit(tmp_path, RunProgress(every_n_steps=2, terminal=False))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[qoq] step")]
    assert [line.split(" | ")[0] for line in lines] == ["[qoq] step 2/4", "[qoq] step 4/4"]
    assert "reward 0.260" in lines[0] and "kl 2.00e-03" in lines[0] and "s/step" in lines[0] and "ETA" in lines[0]


def test_bar_in_a_terminal(tmp_path, capsys) -> None:
    _fit(tmp_path, RunProgress(terminal=True))
    out = capsys.readouterr().out
    assert "train" in out and "4/4" in out and "[qoq] step" not in out
