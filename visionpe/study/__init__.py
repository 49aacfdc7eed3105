"""Extrapolation studies: a YAML study file expands into jobs (encoding x recipe x seed); each job trains,
sweeps and writes its result rows; the report (leaderboard with intervals, anchor checks, plots) is built
from the rows alone. ``python -m visionpe.study --help`` (or ``eval_resolution.py --study FILE``)."""
from .spec import Job, Recipe, StudySpec, load_study, parse_size
from .stats import Interval, paired_bootstrap, t_interval, wilson_interval

__all__ = ['Job', 'Recipe', 'StudySpec', 'load_study', 'parse_size', 'Interval', 'paired_bootstrap',
           't_interval', 'wilson_interval']
