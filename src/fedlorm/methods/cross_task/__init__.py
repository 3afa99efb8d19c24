"""Cross-task rules: how each finished task's update ΔW_t joins the deployed update ΔW."""

from fedlorm.methods.cross_task.base import CrossTaskRule
from fedlorm.methods.cross_task.closed_form import ClosedFormTasks
from fedlorm.methods.cross_task.simple_mean import SimpleMeanTasks
from fedlorm.methods.cross_task.task_arithmetic import TaskArithmetic
from fedlorm.methods.cross_task.ties import TiesMerge

__all__ = ["ClosedFormTasks", "CrossTaskRule", "SimpleMeanTasks", "TaskArithmetic", "TiesMerge"]
