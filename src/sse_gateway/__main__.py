from sse_gateway.cli import main

raise SystemExit(main())
