"""The LightningModules: they wire plain components (models, objective, quantizers, metrics) to Lightning's
loop and hold no method of their own.

- `seq2seq.Seq2SeqModule`: the shared base (one `_step` for train/val/test, generation and scoring,
  optimizer and schedule, per-example test predictions).
- `teacher.TeacherModule`: fine-tunes BART/mBART on a task; its best model becomes the teacher.
- `student.DQStudentModule`: the DQ-BART student (frozen teacher, latent full-precision student,
  quantize-on-forward).

The DataModules are in `dq_lightning.data` (`datamodule` for the benchmarks, `pretrain` for denoising).
"""
