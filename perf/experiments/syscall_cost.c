/* The cost of entering the kernel for nothing: 1,000,000 getppid(2) calls.
 *   gcc -O2 perf/experiments/syscall_cost.c -o /tmp/syscall_cost && /tmp/syscall_cost
 * Prints ns per call (195 ns on the machine of perf/README.md, session 9). */
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    struct timespec a, b;
    const int n = 1000000;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f ns/syscall\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
