/* Callgrind markers for benchmarks/callgrind/peers_pass.py (loaded with ctypes): count only what
   runs between cg_start() and cg_stop(); outside valgrind the requests do nothing. */
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; }
void cg_stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS; CALLGRIND_STOP_INSTRUMENTATION; }
