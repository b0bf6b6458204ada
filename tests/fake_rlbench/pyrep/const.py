"""`pyrep.const` enums used by RLBench's observation config (values of PyRep's simConst)."""

from enum import Enum


class RenderMode(Enum):
    OPENGL = 0
    OPENGL_AUXILIARY = 1
    OPENGL_COLOR_CODED = 2
    POV_RAY = 3
    EXTERNAL = 5
    EXTERNAL_WINDOWED = 6
    OPENGL3 = 7
    OPENGL3_WINDOWED = 8


class Verbosity(Enum):
    NONE = "none"
    ERRORS = "errors"
    WARNINGS = "warnings"
    LOAD_INFOS = "loadinfos"
    SCRIPT_ERRORS = "scripterrors"
    SCRIPT_WARNINGS = "scriptwarnings"
    SCRIPT_INFOS = "scriptinfos"
    INFOS = "infos"
    DEBUG = "debug"
    TRACE = "trace"
    TRACE_LUA = "tracelua"
    TYRACE_ALL = "traceall"  # sic, as in PyRep
