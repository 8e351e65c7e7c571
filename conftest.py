# Repository root on sys.path, so tests import models/, hw/, sim/, qnnfab/ as the CLI does.
