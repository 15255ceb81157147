from .diagnostics import report

print(report())
