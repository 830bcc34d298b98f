"""Splitting a training file among K simulated clients (as FedNLP and Flower
Datasets do): IID, Dirichlet label skew, or Dirichlet quantity skew.

Every scheme returns K disjoint index arrays that together cover every
example once, each non-empty, the same for the same seed in every process
(a client process and the server compute the same split independently).
"""

import numpy as np

from fmkeras.errors import ConfigError


def partition_indices(groups, clients, scheme="iid", alpha=0.5, seed=0):
    """`[indices of client 0, ..., client K-1]` for examples whose partition
    groups (class labels) are `groups`.

    Args:
        groups: one integer per example: its label (the group label skew splits by).
        clients: K, the number of partitions.
        scheme: `iid` (a shuffled even split), `dirichlet` (each group's
            examples split among clients in proportions drawn from Dir(alpha):
            label skew) or `quantity` (client sizes drawn from Dir(alpha),
            labels mixed).
        alpha: the Dirichlet concentration; smaller is more skewed.
        seed: the split's random seed.

    Example:

    >>> parts = partition_indices([0, 1] * 50, clients=4, scheme="dirichlet", alpha=0.5)
    >>> sorted(np.concatenate(parts).tolist()) == list(range(100))
    True
    """
    groups = np.asarray(groups)
    if clients > len(groups):
        raise ConfigError(f"federated.clients={clients} exceeds the {len(groups)} training "
                          "examples: every client needs at least one")  # fmt: skip
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    if scheme == "iid":
        parts = np.array_split(order, clients)
    elif scheme == "quantity":
        parts = np.split(order, _cut_points(rng.dirichlet([alpha] * clients), len(order)))
    elif scheme == "dirichlet":
        pieces = [[] for _ in range(clients)]
        for group in np.unique(groups):
            members = order[groups[order] == group]
            shares = rng.dirichlet([alpha] * clients)
            for client, piece in enumerate(np.split(members, _cut_points(shares, len(members)))):
                pieces[client].append(piece)
        parts = [np.concatenate(piece) for piece in pieces]
    else:
        raise ConfigError(f"federated.partition={scheme!r} is not one of iid, dirichlet, quantity")
    return _no_empty_client([np.sort(part) for part in parts])


def _cut_points(shares, count):
    """Where to cut `count` items into pieces of the given `shares`."""
    return (np.cumsum(shares)[:-1] * count).round().astype(int)


def _no_empty_client(parts):
    """Moves one example from the largest client to each empty one (a heavily
    skewed draw can leave a client with nothing, which Flower cannot train)."""
    for index, part in enumerate(parts):
        if len(part) == 0:
            largest = max(range(len(parts)), key=lambda i: len(parts[i]))
            parts[index], parts[largest] = parts[largest][-1:], parts[largest][:-1]
    return parts


def describe(parts, groups):
    """One line per client: its size and label counts (for the logs)."""
    groups = np.asarray(groups)
    labels = np.unique(groups)
    lines = []
    for index, part in enumerate(parts):
        counts = [int((groups[part] == label).sum()) for label in labels]
        lines.append(f"client {index}: {len(part):,} examples, per label {counts}")
    return lines
