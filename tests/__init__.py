from pathlib import Path

# Real captures from public sources (tests/fixtures/PROVENANCE.md), inside the repository so a bare clone tests.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
