"""Which images each process of a `sample-ddp` job samples, and into which files.

The images still to sample (the gaps between the files on disk) are cut into units, dealt to the
processes in contiguous runs of nearly equal size, and each run is written as one file per chunk:

* **units** follow the batch grid: chunk c holds images [c·C, (c+1)·C) (C = --chunk-size) and its
  batches start at c·C, c·C + B, ... (B = --batch-size). A unit is one batch of that grid, cut where
  images are on disk already. Every unit is sampled as one batch, so image i is computed in the same
  batch whatever the number of processes: the same bytes (see `fastdit.sample_ddp.runner`).
* **shares**: unit u goes to the process in whose 1/W of the pending images its first image falls. A
  process's share is then within one unit (B images) of P/W for P pending images, for any W: with 8
  processes none waits for another's whole chunk, and with more processes than units the ones left
  without work only wait. A rerun after a kill deals what is still missing the same way.
* **pieces**: the units of a share that follow each other inside one chunk are written as one file
  `chunk-<start>-<stop>.npz` once all are sampled: at most a chunk's images are lost to a kill, and a
  file never spans two chunks, so a later run of another --batch-size still finds the grid.
"""

from __future__ import annotations

from .workdir import Chunk


def batch_units(gaps: list[Chunk], *, chunk_size: int, batch_size: int) -> list[Chunk]:
    """The units of the images in `gaps` (disjoint, in order): the batch grid cut at the gaps' ends."""
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk and batch sizes must be positive, got {chunk_size} and {batch_size}")
    units = []
    for gap in gaps:
        start = gap.start
        while start < gap.stop:
            chunk_start = start - start % chunk_size
            next_batch = chunk_start + ((start - chunk_start) // batch_size + 1) * batch_size
            stop = min(next_batch, chunk_start + chunk_size, gap.stop)
            units.append(Chunk(start, stop))
            start = stop
    return units


def deal(units: list[Chunk], world_size: int) -> list[list[Chunk]]:
    """Each process's units, in order: process r takes the units whose first image is among the images
    [r·P/W, (r+1)·P/W) of the P pending ones, counted in order. Every process computes the same deal."""
    if world_size < 1:
        raise ValueError(f"world size must be positive, got {world_size}")
    total = sum(len(unit) for unit in units)
    shares = [[] for _ in range(world_size)]
    before = 0  # pending images before this unit
    for unit in units:
        shares[before * world_size // total].append(unit)
        before += len(unit)
    return shares


def pieces(share: list[Chunk], chunk_size: int) -> list[tuple[Chunk, list[Chunk]]]:
    """(file, its units) for a share: runs of adjacent units inside one chunk, each written as one file."""
    grouped: list[tuple[Chunk, list[Chunk]]] = []
    for unit in share:
        if grouped:
            piece, units = grouped[-1]
            if unit.start == piece.stop and unit.start // chunk_size == piece.start // chunk_size:
                grouped[-1] = (Chunk(piece.start, unit.stop), [*units, unit])
                continue
        grouped.append((unit, [unit]))
    return grouped
