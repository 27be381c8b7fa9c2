"""The teachers: frozen models fed their own inputs (``ensemble``), sharded over processes (``sharding``), and
the one place a run's teacher outputs come from, live or cached (``source``)."""

from .ensemble import LabelSpaceError, Teachers, check_label_spaces, freeze, teacher_input_spec, teacher_keys
from .source import TeacherSource, open_teacher_cache, place_teachers, teacher_dtype

__all__ = ["LabelSpaceError", "TeacherSource", "Teachers", "check_label_spaces", "freeze", "open_teacher_cache",
           "place_teachers", "teacher_dtype", "teacher_input_spec", "teacher_keys"]
