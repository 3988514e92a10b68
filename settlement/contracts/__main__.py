from openledger.settlement.contracts import main

main()
