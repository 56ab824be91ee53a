from stargz_store.cli import main

raise SystemExit(main())
