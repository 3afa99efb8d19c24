"""Head strategies: how the server merges the linear head, with the summands clients send for it."""

from fedlorm.methods.heads.analytic import AnalyticHead
from fedlorm.methods.heads.average import TrainedAverageHead
from fedlorm.methods.heads.base import HeadStrategy
from fedlorm.methods.heads.ccvr import CCVRHead
from fedlorm.methods.heads.regmean import RegMeanHead

__all__ = ["AnalyticHead", "CCVRHead", "HeadStrategy", "RegMeanHead", "TrainedAverageHead"]
