(function(){var errors=[];
window.addEventListener('error',function(e){var t=e.target;errors.push(t&&t.tagName?('failed to load '+t.tagName+(t.alt?' '+t.alt:'')):String(e.message));},true);
window.addEventListener('load',function(){var all=document.querySelectorAll('img'),decoded=0,gallery=0,galleryDecoded=0;
for(var i=0;i<all.length;i++){var ok=all[i].complete&&all[i].naturalWidth>0;if(ok)decoded++;if(all[i].closest('.gallery')){gallery++;if(ok)galleryDecoded++;}}
var b=document.body;b.setAttribute('data-images',all.length);b.setAttribute('data-images-decoded',decoded);
b.setAttribute('data-gallery-images',gallery);b.setAttribute('data-gallery-decoded',galleryDecoded);
b.setAttribute('data-errors',errors.join(' | '));b.setAttribute('data-report-loaded','1');});})();
