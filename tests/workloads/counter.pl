#!/usr/bin/perl
# A Perl workload for ferry's end-to-end tests: holds a ~48 MiB patterned string and a
# 100k-element array, appends `tick N` lines to the log ($ARGV[0]), and on SIGTERM
# checks them and writes PASS or FAIL: <what> as the last line (exit 0 or 1).
use strict;
use warnings;
use Fcntl qw(O_WRONLY O_APPEND O_CREAT);
use Time::HiRes qw(sleep);

my $SEED    = 0x5EEDF00D;
my $PAGES   = 12288;    # 48 MiB of 4 KiB pages
my $ENTRIES = 100_000;

sysopen(my $log, $ARGV[0], O_WRONLY | O_APPEND | O_CREAT, 0644) or die "open log: $!";

# One syswrite per line: nothing buffered across a checkpoint.
sub line { my $text = "$_[0]\n"; syswrite($log, $text) == length($text) or die "write log: $!"; }

# Each page names its index, so a page restored in the wrong place is caught.
sub page { return pack("NN", $_[0], $SEED) x 512; }

my $stop = 0;
$SIG{TERM} = sub { $stop = 1; };

my $big = '';
$big .= page($_) for 0 .. $PAGES - 1;
my @array = map { $_ * 7 + $SEED } 0 .. $ENTRIES - 1;
line("ready");

my $tick = 0;
while (!$stop) {
    $tick++;
    line("tick $tick");
    sleep(0.02);
}

my $failure;
if (length($big) != $PAGES * 4096) {
    $failure = "string length " . length($big);
} else {
    for my $p (0 .. $PAGES - 1) {
        if (substr($big, $p * 4096, 4096) ne page($p)) { $failure = "string page $p differs"; last; }
    }
}
if (!defined $failure) {
    if (@array != $ENTRIES) {
        $failure = "array has " . scalar(@array) . " elements";
    } else {
        for my $i (0 .. $ENTRIES - 1) {
            if ($array[$i] != $i * 7 + $SEED) { $failure = "array element $i is $array[$i]"; last; }
        }
    }
}
line(defined $failure ? "FAIL: $failure" : "PASS");
exit(defined $failure ? 1 : 0);
