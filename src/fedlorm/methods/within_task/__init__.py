"""Within-task client merges: which factor clients train each round and how the server merges them.

One module per rule; each rule keeps its client summands, their reply spec and the server's solve
together (:class:`~fedlorm.methods.within_task.base.WithinTaskMerge`).
"""

from fedlorm.methods.within_task.average import FactorAverage
from fedlorm.methods.within_task.base import ALTERNATE, LayerShape, WithinTaskMerge
from fedlorm.methods.within_task.closed_form import AlternatingClosedForm
from fedlorm.methods.within_task.fisher import FisherAverage
from fedlorm.methods.within_task.product import ProductAverage
from fedlorm.methods.within_task.regmean import DeltaRegMean

__all__ = [
    "ALTERNATE",
    "AlternatingClosedForm",
    "DeltaRegMean",
    "FactorAverage",
    "FisherAverage",
    "LayerShape",
    "ProductAverage",
    "WithinTaskMerge",
]
