"""Distillation: a shallower student copied from the teacher, the losses between them, loyalty metrics."""
