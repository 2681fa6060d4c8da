"""Compilation: ONNX graphs -> TVM Relax modules, tuned with MetaSchedule, cached by content."""
