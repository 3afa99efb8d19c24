"""Layer 3, FCIL bookkeeping: scenario (class order, tasks), client partitions and sampling, metrics."""

from fedlorm.fcl.metrics import average_accuracy, summarize
from fedlorm.fcl.participation import clients_per_round, sample_clients
from fedlorm.fcl.partition import client_label_counts, dirichlet_partition, iid_partition
from fedlorm.fcl.scenario import Scenario, make_scenario

__all__ = [
    "Scenario",
    "average_accuracy",
    "client_label_counts",
    "clients_per_round",
    "dirichlet_partition",
    "iid_partition",
    "make_scenario",
    "sample_clients",
    "summarize",
]
