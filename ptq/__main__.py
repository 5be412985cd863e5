from ptq.cli import main

raise SystemExit(main())
