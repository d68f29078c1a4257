// CPU per durable write, by how it is made durable: 200-byte writes into a file of zeros
// (written and synced first, as a spare log segment), paced at RATE per second, N of them.
// Prints p50/p99 latency, CPU per write (getrusage: user + system, the pacing sleep included)
// and voluntary context switches per write.
//
//   gcc -O2 -o /tmp/sync_cpu_probe perf/experiments/sync_cpu_probe.c
//   for m in fdatasync dsync direct directfd; do /tmp/sync_cpu_probe $m 2000 1000; done
//
// Modes: `fdatasync` (pwrite + fdatasync, as the local log), `dsync` (O_DSYNC pwrite),
// `direct` (O_DIRECT|O_DSYNC, the 4 KiB blocks holding the write), `directfd` (O_DIRECT, then
// fdatasync). Optional 4th argument: the file (default target/tmp/sync_cpu_probe.dat).
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/uio.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
int main(int argc,char**argv){
  const char*mode=argv[1]; int n=atoi(argv[2]); int rate=atoi(argv[3]);
  const char*path=argc>4?argv[4]:"target/tmp/sync_cpu_probe.dat";
  size_t size=64<<20;
  int fd=open(path,O_RDWR|O_CREAT|O_TRUNC,0644);
  char*z=aligned_alloc(4096,1<<20); memset(z,0,1<<20);
  for(size_t o=0;o<size/16;o+=1<<20) pwrite(fd,z,1<<20,o);
  fsync(fd); close(fd);
  int flags=O_RDWR;
  if(!strcmp(mode,"direct")) flags|=O_DIRECT|O_DSYNC;
  if(!strcmp(mode,"dsync")) flags|=O_DSYNC;
  if(!strcmp(mode,"directfd")) flags|=O_DIRECT;
  fd=open(path,flags);
  char*buf=aligned_alloc(4096,8192); memset(buf,'x',8192);
  double*lat=malloc(n*sizeof(double)); size_t off=0;
  struct rusage r0,r1; getrusage(RUSAGE_SELF,&r0);
  double t0=now(); double period=1e6/rate;
  for(int i=0;i<n;i++){
    double due=t0+i*period; while(now()<due){ double d=due-now(); if(d>50){struct timespec s={0,(long)((d-20)*1000)};nanosleep(&s,0);} }
    double a=now();
    if(!strcmp(mode,"direct")||!strcmp(mode,"directfd")){
      size_t blk=off&~4095UL; size_t end=off+200; size_t len=((end+4095)&~4095UL)-blk;
      pwrite(fd,buf,len,blk); if(!strcmp(mode,"directfd")) fdatasync(fd);
    } else { pwrite(fd,buf,200,off); if(strcmp(mode,"dsync")) fdatasync(fd); }
    off+=200;
    lat[i]=now()-a;
  }
  getrusage(RUSAGE_SELF,&r1);
  qsort(lat,n,sizeof(double),cmp);
  double cpu=(r1.ru_utime.tv_sec-r0.ru_utime.tv_sec)*1e6+(r1.ru_utime.tv_usec-r0.ru_utime.tv_usec)+(r1.ru_stime.tv_sec-r0.ru_stime.tv_sec)*1e6+(r1.ru_stime.tv_usec-r0.ru_stime.tv_usec);
  printf("%-9s p50 %6.0f p99 %6.0f us  cpu %5.1f us/op  vcsw %.2f/op\n",mode,lat[n/2],lat[n*99/100],cpu/n,(double)(r1.ru_nvcsw-r0.ru_nvcsw)/n);
}
