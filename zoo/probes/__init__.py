"""Probes of trained or constructed models: the memory tail (zoo.probes.memory_tail) and the
explicit constructions of the theory (zoo.probes.construction). docs/memory_tail.md."""

from zoo.probes.construction import explicit_construction, feedback_layers
from zoo.probes.predictions import TailPrediction, mixer_tail, predicted_tail
from zoo.probes.memory_tail import (Curve, Fit, ProbeResult, Routing, feedback_kernel_curve, fit_tail, format_table,
                                    forward_ad_backends, jacobian_curve, plot, probe, random_inputs,
                                    routing_statistics, task_inputs)

__all__ = ["Curve", "Fit", "ProbeResult", "Routing", "TailPrediction", "explicit_construction", "feedback_kernel_curve",
           "feedback_layers", "fit_tail", "format_table", "forward_ad_backends", "jacobian_curve", "mixer_tail", "plot", "predicted_tail", "probe",
           "random_inputs", "routing_statistics", "task_inputs"]
